"""ViT classifier for fine-tuning (docs/method.md §4.3): a timm ``VisionTransformer`` plus a SupCon head.

The ViT is built with ``timm.create_model`` so that its state dict *is* a timm state dict: the
export is ``self.vit.state_dict()`` and :meth:`ViTClassifier.timm_spec` says how to rebuild it.
Weights come from anything :mod:`amgsn.models.pretrained` reads (an ``amgsn pretrain`` checkpoint,
an MAE checkpoint, timm weights, ``timm:`` / ``hf-hub:``), or nothing (from scratch); the mapping
(resampling to another image / patch size, heads of another class count) lives there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from amgsn.models.pretrained import InitWeights, LoadReport, load_init, read_init, resolve_size
from amgsn.models.regions import EAGER, Regions
from amgsn.models.sizes import get_size, timm_vit_spec
from amgsn.ops._checks import check_tensor

POOLS = ("avg", "token")

class ViTClassifier(nn.Module):
    """timm ViT + a 2-layer projection head (D -> D -> ``proj_dim``, L2-normalised) for SupCon.

    Args:
        model: ``vit_tiny`` | ``vit_small`` | ``vit_base`` (mapped to timm's ``*_patch16_224``
            with ``img_size`` / ``patch_size`` overrides).
        num_classes: C.
        img_size, patch_size, depth: as :class:`~amgsn.models.vit_mae.MaskedAutoencoderViT`.
        global_pool: ``"avg"`` (mean of the patch tokens, then ``fc_norm``; MAE's fine-tuning
            default) or ``"token"`` (the CLS token after ``norm``).
        drop_path_rate: stochastic depth (MAE fine-tuning: 0.1).
        proj_dim: output width of the SupCon projection head.
    """

    def __init__(
        self,
        model: str = "vit_base",
        num_classes: int = 7,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        depth: int | None = None,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_path_rate: float = 0.1,
        proj_dim: int = 128,
    ) -> None:
        super().__init__()
        get_size(model)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
        if img_size % patch_size != 0:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        self.model_name = model
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.depth = get_size(model).depth if depth is None else depth
        self.global_pool = global_pool
        self.num_classes = num_classes
        name, kwargs = self.timm_spec()
        self.vit = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                     drop_path_rate=drop_path_rate, **kwargs)
        D = self.vit.embed_dim
        self.proj_head = nn.Sequential(nn.Linear(D, D), nn.ReLU(inplace=True), nn.Linear(D, proj_dim))
        # Eager: timm's own forward_features; compiled (amgsn.engine.compile): block by block through
        # the "classifier.block" region. Not a module: the state dict is the same either way.
        self.regions: Regions = EAGER

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> logits (B, num_classes)."""
        return self.forward_features_and_logits(x)[1]

    def forward_features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> (pooled feature (B, D) after the final norm — what the center loss
        sees —, logits (B, num_classes))."""
        check_tensor("x", x, ndim=4, floating=True)
        expected = (self.in_chans, self.img_size, self.img_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x must be (B, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(x.shape)}"
            )
        feats = self._features_by_region(x) if self.regions.compiled else self.vit.forward_features(x)
        pooled = self.vit.forward_head(feats, pre_logits=True)
        return pooled, self.vit.head(pooled)

    def _features_by_region(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``VisionTransformer.forward_features`` (no attention mask, no gradient checkpointing)
        with each block run by ``self.regions``."""
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for blk in vit.blocks:
            x = self.regions.run("classifier.block", blk, x)
        return vit.norm(x)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (B, D) -> (B, proj_dim) L2-normalised embedding for the SupCon loss."""
        return F.normalize(self.proj_head(pooled), dim=-1)

    # ------------------------------------------------------------------ timm interop

    def timm_spec(self) -> tuple[str, dict[str, Any]]:
        """(timm model name, kwargs) such that ``timm.create_model(name, num_classes=C, **kwargs)``
        builds exactly ``self.vit`` (kwargs: img_size, patch_size, global_pool, depth if not 12)."""
        name, kwargs = timm_vit_spec(self.model_name, self.img_size, self.patch_size, self.depth)
        out: dict[str, Any] = dict(kwargs)
        if self.in_chans != 3:
            out["in_chans"] = self.in_chans
        out["global_pool"] = self.global_pool
        return name, out

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """The ViT's weights under timm names (the projection head is training-only)."""
        return {k: v.detach().clone() for k, v in self.vit.state_dict().items()}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's ViT layer grouping with our ``vit.`` prefix, for timm's layer-decay optimiser
        factory; the projection head and the classifier head fall in the last group."""
        return {"stem": r"^vit\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)",
                "blocks": [(r"^vit\.blocks\.(\d+)", None), (r"^vit\.norm", (99999,))]}

    def no_weight_decay(self) -> set[str]:
        return {"vit.pos_embed", "vit.cls_token"}

    def describe(self) -> str:
        """``vit_tiny classifier (64 px, 8-px patches, 6 blocks)``: the target in load summaries."""
        return f"{self.model_name} classifier ({self.img_size} px, {self.patch_size}-px patches, {self.depth} blocks)"

    def load_init(self, init: InitWeights) -> LoadReport:
        """Load pre-trained weights (see :func:`amgsn.models.pretrained.read_init`) into the ViT.

        The encoder loads, resampled to this image / patch size where they differ; the final norm
        lands in ``fc_norm`` for average pooling (MAE's fine-tuning re-initialises it; we carry the
        pre-trained affine over). The classifier head loads when the file has one of this class
        count; otherwise it starts at MAE's fine-tuning init (weights N(0, 2e-5), zero bias) and the
        report says so. ValueError when the width differs (a vit_small file into a vit_tiny)."""
        resolve_size(init, {"model": self.model_name})
        report = load_init(self.vit, init, target=self.describe())
        if "head.weight" not in report.loaded:
            with torch.no_grad():
                trunc_normal_(self.vit.head.weight, std=2e-5)
                nn.init.zeros_(self.vit.head.bias)
            for key in ("head.weight", "head.bias"):
                if key in report.kept_init:
                    report.kept_init[key] = "MAE's fine-tuning init"
        self.init_report = report
        return report

    def load_pretrain_checkpoint(self, state: Mapping[str, Any]) -> LoadReport:
        """Load the MAE encoder of an ``amgsn pretrain`` checkpoint dict
        (``{"kind": "pretrain", "model": mae_state_dict, ...}``) into the ViT (:meth:`load_init`).
        TypeError for a non-dict, ValueError for another ``kind`` or another width."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a checkpoint dict, got {type(state).__name__}")
        kind = state.get("kind")
        if kind != "pretrain":
            raise ValueError(
                f"checkpoint kind is {kind!r}, expected 'pretrain' (an `amgsn pretrain` checkpoint)"
            )
        return self.load_init(read_init(state, what="pretrain checkpoint"))

    def load_timm_weights(self, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> LoadReport:
        """Load a timm-format ViT state dict (a ``.safetensors`` / ``.pth`` / ``.bin`` file, or the
        dict) with :meth:`load_init`."""
        return self.load_init(read_init(source))

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_init(
        cls, spec: str | os.PathLike | Mapping[str, Any] | InitWeights, num_classes: int, **kwargs: Any
    ) -> ViTClassifier:
        """A classifier initialised from ``spec`` (anything :func:`~amgsn.models.pretrained.read_init`
        reads). ``model`` / ``img_size`` / ``patch_size`` / ``depth`` / ``in_chans`` in ``kwargs`` that
        are None or absent come from the weights; given, the weights are fitted to them (another width is a
        ValueError). Other ``kwargs``: constructor arguments (global_pool, drop_path_rate, proj_dim).
        The load summary is ``model.init_report``."""
        init = spec if isinstance(spec, InitWeights) else read_init(spec)
        keys = ("model", "img_size", "patch_size", "depth", "in_chans")
        size = resolve_size(init, {k: kwargs.pop(k, None) for k in keys})
        model = cls(size["model"], num_classes, img_size=size["img_size"], patch_size=size["patch_size"],
                    depth=size["depth"], in_chans=size["in_chans"], **kwargs)
        model.load_init(init)
        return model

    @classmethod
    def from_pretrain_checkpoint(
        cls, state: Mapping[str, Any], num_classes: int, **kwargs: Any
    ) -> ViTClassifier:
        """A classifier from an ``amgsn pretrain`` checkpoint dict (see :meth:`from_init`)."""
        if not isinstance(state, Mapping) or state.get("kind") != "pretrain" or "model" not in state:
            raise ValueError("state must be an `amgsn pretrain` checkpoint dict with a 'model' entry")
        return cls.from_init(state, num_classes, **kwargs)

    @classmethod
    def from_timm_weights(
        cls, source: str | os.PathLike | Mapping[str, torch.Tensor], num_classes: int, **kwargs: Any
    ) -> ViTClassifier:
        """A classifier from a timm-format weights file or state dict (see :meth:`from_init`)."""
        return cls.from_init(source, num_classes, **kwargs)
