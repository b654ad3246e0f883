"""ViT classifier for fine-tuning (DESIGN §4.3): a timm ``VisionTransformer`` plus a SupCon head.

The ViT is built with ``timm.create_model`` so that its state dict *is* a timm state dict: the
export is ``self.vit.state_dict()`` and :meth:`ViTClassifier.timm_spec` says how to rebuild it.
Weights come from an ``amgsn pretrain`` checkpoint (the MAE encoder), a timm-format file, or
nothing (from scratch). Sizes are never interpolated: a mismatch is an error that names it.
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

from amgsn.models.sizes import VIT_SIZES, get_size, timm_vit_spec
from amgsn.ops._checks import check_tensor
from amgsn.safe_load import safe_torch_load

POOLS = ("avg", "token")
# Prefixes wrappers add to state-dict keys: DistributedDataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def infer_vit_config(state: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, Any]:
    """Read the encoder configuration off a ViT/MAE state dict (timm names).

    Returns ``{"model", "img_size", "patch_size", "depth", "in_chans"}``. ValueError naming
    ``source`` when a key is missing or the width matches no known size.
    """
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise ValueError(f"{source} has no '{key}': not a ViT encoder state dict")
    width = int(state["cls_token"].shape[-1])
    names = [n for n, s in VIT_SIZES.items() if s.embed_dim == width]
    if not names:
        raise ValueError(f"{source} has width {width}, which matches no size in {sorted(VIT_SIZES)}")
    proj = state["patch_embed.proj.weight"]  # (D, C, p, p)
    patch_size = int(proj.shape[-1])
    num_patches = int(state["pos_embed"].shape[1]) - 1
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise ValueError(f"{source} has {num_patches} position embeddings (+CLS), not a square grid")
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    return {"model": names[0], "img_size": grid * patch_size, "patch_size": patch_size,
            "depth": depth, "in_chans": int(proj.shape[1])}


def _final_norm_key(global_pool: str) -> str:
    # timm moves the final norm after the pooling ("fc_norm") for average pooling.
    return "fc_norm" if global_pool == "avg" else "norm"


def _encoder_only(state: Mapping[str, torch.Tensor], global_pool: str) -> dict[str, torch.Tensor]:
    """The encoder keys of a timm or MAE state dict, the final norm renamed for ``global_pool``."""
    target = _final_norm_key(global_pool)
    out = {}
    for key, value in state.items():
        head = key.split(".", 1)[0]
        if head in ("cls_token", "pos_embed", "patch_embed", "blocks"):
            out[key] = value
        elif head in ("norm", "fc_norm"):
            out[target + key[len(head):]] = value
    return out


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
        pooled = self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)
        return pooled, self.vit.head(pooled)

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

    def _check_config(self, found: Mapping[str, Any], source: str) -> None:
        ours = {"model": self.model_name, "img_size": self.img_size, "patch_size": self.patch_size,
                "depth": self.depth, "in_chans": self.in_chans}
        bad = [f"{k}: {source} has {found[k]!r}, classifier has {ours[k]!r}"
               for k in ours if k in found and found[k] is not None and found[k] != ours[k]]
        if bad:
            raise ValueError(f"{source} does not match this classifier — " + "; ".join(bad))

    def _load_encoder(self, encoder: dict[str, torch.Tensor], source: str, with_head: bool) -> None:
        result = self.vit.load_state_dict(encoder, strict=False)
        allowed = set() if with_head else {"head.weight", "head.bias"}
        missing = set(result.missing_keys) - allowed
        if missing or result.unexpected_keys:
            raise ValueError(f"{source} does not fit the {self.model_name} encoder: missing "
                             f"{sorted(missing)}, unexpected {sorted(result.unexpected_keys)}")

    def load_pretrain_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Load the MAE encoder of an ``amgsn pretrain`` checkpoint dict
        (``{"kind": "pretrain", "model": mae_state_dict, "args": {...}}``) into the ViT.

        The head and the projection head keep their initialisation (head weights N(0, 2e-5) as
        MAE's fine-tuning). The final norm lands in ``fc_norm`` for average pooling. ValueError on
        a wrong ``kind`` or any size mismatch (model, img_size, patch_size, depth)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a checkpoint dict, got {type(state).__name__}")
        kind = state.get("kind")
        if kind != "pretrain":
            raise ValueError(
                f"checkpoint kind is {kind!r}, expected 'pretrain' (an `amgsn pretrain` checkpoint)"
            )
        if "model" not in state:
            raise ValueError("pretrain checkpoint has no 'model' entry")
        sd = _strip_prefixes(state["model"])
        args = state.get("args") or {}
        self._check_config({k: args.get(k) for k in ("model", "img_size", "patch_size")},
                           "pretrain checkpoint args")
        self._check_config(infer_vit_config(sd, "pretrain checkpoint weights"), "pretrain checkpoint weights")
        self._load_encoder(_encoder_only(sd, self.global_pool), "pretrain checkpoint", with_head=False)
        with torch.no_grad():
            trunc_normal_(self.vit.head.weight, std=2e-5)
            nn.init.zeros_(self.vit.head.bias)

    def load_timm_weights(self, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
        """Load a timm-format ViT state dict (a ``.safetensors`` / ``.pth`` / ``.bin`` file, or the
        dict). The classifier head is loaded only if its shape matches ``num_classes``; the final
        norm is moved between ``norm`` and ``fc_norm`` to fit this pooling. ValueError on a size
        mismatch."""
        name = str(source) if not isinstance(source, Mapping) else "timm weights"
        sd = _strip_prefixes(_read_state_file(source) if not isinstance(source, Mapping) else source)
        self._check_config(infer_vit_config(sd, name), name)
        encoder = _encoder_only(sd, self.global_pool)
        head_fits = all(k in sd and sd[k].shape == getattr(self.vit.head, k.split(".")[1]).shape
                        for k in ("head.weight", "head.bias"))
        if head_fits:
            encoder.update({"head.weight": sd["head.weight"], "head.bias": sd["head.bias"]})
        self._load_encoder(encoder, name, with_head=head_fits)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_pretrain_checkpoint(
        cls, state: Mapping[str, Any], num_classes: int, **kwargs: Any
    ) -> ViTClassifier:
        """A classifier of the checkpoint's size (model, img_size, patch_size, depth read from the
        weights) initialised from its MAE encoder. ``kwargs``: other constructor arguments
        (global_pool, drop_path_rate, proj_dim); a size given here must equal the checkpoint's."""
        if not isinstance(state, Mapping) or "model" not in state:
            raise ValueError("state must be an `amgsn pretrain` checkpoint dict with a 'model' entry")
        found = infer_vit_config(_strip_prefixes(state["model"]), "pretrain checkpoint weights")
        model = cls(**_merge_size(found, kwargs, "pretrain checkpoint"), num_classes=num_classes)
        model.load_pretrain_checkpoint(state)
        return model

    @classmethod
    def from_timm_weights(
        cls, source: str | os.PathLike | Mapping[str, torch.Tensor], num_classes: int, **kwargs: Any
    ) -> ViTClassifier:
        """A classifier of the size stored in a timm-format weights file (see
        :meth:`load_timm_weights`), initialised from it."""
        sd = _strip_prefixes(_read_state_file(source) if not isinstance(source, Mapping) else source)
        found = infer_vit_config(sd, str(source) if not isinstance(source, Mapping) else "timm weights")
        model = cls(**_merge_size(found, kwargs, "timm weights"), num_classes=num_classes)
        model.load_timm_weights(sd)
        return model


def _merge_size(found: dict[str, Any], kwargs: dict[str, Any], source: str) -> dict[str, Any]:
    bad = [f"{k}: {source} has {found[k]!r}, requested {kwargs[k]!r}"
           for k in found if k in kwargs and kwargs[k] is not None and kwargs[k] != found[k]]
    if bad:
        raise ValueError(f"{source} does not match the requested classifier — " + "; ".join(bad))
    return {**kwargs, **found}


def _read_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (a bare state dict, or one under
    ``"model"`` / ``"state_dict"``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"timm weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = safe_torch_load(path, what="timm weights file")
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(obj)
