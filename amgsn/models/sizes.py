"""Model sizes shared by the MAE and the classifier, and their timm names.

One table so that a pre-training checkpoint's ``model`` argument means the same encoder in both.
"""

from __future__ import annotations

from typing import NamedTuple


class ViTSize(NamedTuple):
    """Encoder width/depth/heads of a named size, the default MAE decoder, and timm's model name."""

    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    timm_name: str


# Decoder: MAE's 512-wide, 8-block, 16-head decoder for ViT-B; scaled down for the smaller encoders
# (the decoder only has to reconstruct pixels and is discarded after pre-training).
VIT_SIZES: dict[str, ViTSize] = {
    "vit_tiny": ViTSize(192, 12, 3, 128, 4, 4, "vit_tiny_patch16_224"),
    "vit_small": ViTSize(384, 12, 6, 256, 4, 8, "vit_small_patch16_224"),
    "vit_base": ViTSize(768, 12, 12, 512, 8, 16, "vit_base_patch16_224"),
}


DEFAULT_SIZE: dict[str, object] = {"model": "vit_tiny", "img_size": 112, "patch_size": 8}
"""Encoder size of a from-scratch run when none is given (pre-training and fine-tuning); with
``--init`` the size comes from the weights."""


def get_size(name: str) -> ViTSize:
    """Look up a size by name; ValueError listing the known names otherwise."""
    if name not in VIT_SIZES:
        raise ValueError(f"model must be one of {sorted(VIT_SIZES)}, got {name!r}")
    return VIT_SIZES[name]


def timm_vit_spec(
    model: str, img_size: int, patch_size: int, depth: int | None = None
) -> tuple[str, dict[str, int]]:
    """(timm model name, kwargs) that build this encoder with ``timm.create_model``.

    ``depth`` is passed only when it differs from the named size (small test configurations):
    timm's model functions let keyword arguments override their defaults.
    """
    size = get_size(model)
    kwargs: dict[str, int] = {"img_size": int(img_size), "patch_size": int(patch_size)}
    if depth is not None and depth != size.depth:
        kwargs["depth"] = int(depth)
    return size.timm_name, kwargs
