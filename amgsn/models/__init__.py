"""Models: the MAE with a packed variable-length encoder, the ViT classifier, attention backends."""

from amgsn.models.attention import BACKENDS, PackedLayout, resolve_backend, varlen_attention
from amgsn.models.blocks import block_forward_packed, block_forward_padded
from amgsn.models.classifier import ViTClassifier
from amgsn.models.cls_qk import cls_query_keys
from amgsn.models.pos_embed import sincos_2d
from amgsn.models.pretrained import InitWeights, LoadReport, infer_vit_config, read_init
from amgsn.models.sizes import VIT_SIZES, get_size, timm_vit_spec
from amgsn.models.vit_mae import MAEOutput, MaskedAutoencoderViT

__all__ = [
    "BACKENDS",
    "InitWeights",
    "LoadReport",
    "MAEOutput",
    "MaskedAutoencoderViT",
    "PackedLayout",
    "VIT_SIZES",
    "ViTClassifier",
    "block_forward_packed",
    "block_forward_padded",
    "cls_query_keys",
    "get_size",
    "infer_vit_config",
    "read_init",
    "resolve_backend",
    "sincos_2d",
    "timm_vit_spec",
    "varlen_attention",
]
