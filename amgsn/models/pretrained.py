"""Start a model from pre-trained weights — ``--init SPEC`` of ``amgsn pretrain`` and ``amgsn finetune``.

One place reads every kind of weights and maps them onto either model (the MAE of pre-training and
the timm ViT inside the fine-tuning classifier), so both stages accept the same SPEC:

* a local file: an official MAE checkpoint (``{"model": state_dict}`` with MAE's names — encoder
  only as ``mae_pretrain_vit_*.pth``, encoder + decoder as ``mae_visualize_vit_*.pth``), an
  ``amgsn pretrain`` checkpoint, or a timm state dict (``.pth`` / ``.bin`` / ``.safetensors``);
* ``timm:<model name>[.<tag>]`` (e.g. ``timm:vit_base_patch16_224.mae``): timm's registry of
  pretrained weights says where they live, timm's Hugging Face helper fetches them — so the Hugging
  Face cache, ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` apply; ``hf-hub:<org>/<repo>``
  likewise.

Torch files are read with :func:`amgsn.safe_load.safe_torch_load` (``weights_only=True``),
``.safetensors`` with safetensors: nothing in a weights file runs.

Names: MAE's encoder parameter names are timm's ``VisionTransformer`` names and its decoder names are
ours, so one mapping serves every source; only the final norm moves between ``norm`` and ``fc_norm``
to fit the target's pooling. The encoder's width (hence heads, see :mod:`.sizes`), depth, grid and
patch size are read off the weights; a target may differ in image size (learned position
embeddings resampled with timm's ``resample_abs_pos_embed``; fixed sin-cos tables recomputed), in
patch size (patch embedding resampled with timm's ``resample_patch_embed``) and in depth (missing
blocks keep their initialisation, surplus ones are ignored). A different width cannot be
reconciled: ValueError naming both shapes. :meth:`LoadReport.summary` is the one line saying what
happened to every tensor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from amgsn.models.pos_embed import sincos_2d
from amgsn.models.sizes import VIT_SIZES, get_size
from amgsn.safe_load import safe_torch_load

# Prefixes wrappers add to state-dict keys: DistributedDataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_DECODER_HEADS = ("decoder_embed", "mask_token", "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred")
_BLOCK_LISTS = ("blocks", "decoder_blocks")
SPEC_PREFIXES = ("timm:", "hf-hub:")


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
        raise ValueError(f"{source} has width {width} (cls_token {tuple(state['cls_token'].shape)}), which matches "
                         f"no size in {sorted(VIT_SIZES)}")
    proj = state["patch_embed.proj.weight"]  # (D, C, p, p)
    patch_size = int(proj.shape[-1])
    num_patches = int(state["pos_embed"].shape[1]) - 1
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise ValueError(f"{source} has {num_patches} position embeddings (+CLS), not a square grid")
    return {"model": names[0], "img_size": grid * patch_size, "patch_size": patch_size,
            "depth": _num_blocks(state, "blocks"), "in_chans": int(proj.shape[1])}


def _num_blocks(state: Mapping[str, Any], prefix: str) -> int:
    return 1 + max((int(k.split(".")[1]) for k in state if k.startswith(prefix + ".")), default=-1)


def _read_state_file(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (a bare state dict, or one under
    ``"model"`` / ``"state_dict"``)."""
    obj = _read_file(path, what)
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def _read_file(path: str | os.PathLike, what: str) -> Any:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what} not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # noqa: BLE001 — truncated / not safetensors: one line naming the file
            raise ValueError(f"{path} is not a readable safetensors file ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return safe_torch_load(path, what=what)


# --------------------------------------------------------------------------- reading a SPEC


@dataclass
class InitWeights:
    """Weights read from an ``--init`` SPEC: prefix-stripped tensors plus what they are.

    ``config``: the encoder's size as :func:`infer_vit_config` reads it, plus ``decoder_embed_dim``
    / ``decoder_depth`` (and ``decoder_num_heads`` from an amgsn checkpoint) when the weights hold an
    MAE decoder.
    """

    spec: str
    state: dict[str, torch.Tensor]
    kind: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def has_decoder(self) -> bool:
        return "decoder_embed.weight" in self.state


def read_init(spec: str | os.PathLike | Mapping[str, Any], *, what: str = "--init") -> InitWeights:
    """Read SPEC (see the module docstring), or take a checkpoint / state dict already in memory.

    ValueError (one line, naming SPEC) for a missing file, a fine-tuning checkpoint (continue those
    with ``--resume``), weights that are not a ViT encoder of a known width, or weights the Hugging
    Face hub / its cache cannot provide; :class:`~amgsn.safe_load.UnsafeFileError` for a torch file
    that would run code.
    """
    if isinstance(spec, Mapping):
        name, obj = "weights", spec
    else:
        name = os.fspath(spec)
        if name.startswith(SPEC_PREFIXES):
            state = _hub_state(name, what)
            return _make_init(name, state, "timm weights" if name.startswith("timm:") else "hf-hub weights", {})
        obj = _read_file(name, f"{what} file")
    if isinstance(obj, Mapping) and "kind" in obj:
        kind = obj["kind"]
        if kind != "pretrain":
            hint = " (continue a fine-tuning run with --resume)" if kind == "finetune" else ""
            raise ValueError(f"{what} {name} is a {kind!r} checkpoint; {what} takes an `amgsn pretrain` checkpoint, "
                             f"an MAE checkpoint or timm weights{hint}")
        if not isinstance(obj.get("model"), Mapping):
            raise ValueError(f"{what} {name}: the pretrain checkpoint has no 'model' entry")
        extra = {k: v for k, v in (obj.get("model_config") or {}).items() if k == "decoder_num_heads"}
        return _make_init(name, dict(obj["model"]), "amgsn pretrain checkpoint", extra)
    kind = "timm weights"
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        kind = "MAE checkpoint"
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and "model" in obj:
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{what} {name} does not hold a state dict of tensors")
    return _make_init(name, dict(obj), kind, {})


def _make_init(spec: str, state: dict[str, torch.Tensor], kind: str, extra: dict[str, Any]) -> InitWeights:
    state = _strip_prefixes(state)
    config = infer_vit_config(state, f"--init {spec}")
    if "decoder_embed.weight" in state:
        config["decoder_embed_dim"] = int(state["decoder_embed.weight"].shape[0])
        config["decoder_depth"] = _num_blocks(state, "decoder_blocks")
        config.update(extra)
    return InitWeights(spec, state, kind, config)


def _hub_state(spec: str, what: str) -> dict[str, torch.Tensor]:
    """The state dict behind ``timm:<name>`` / ``hf-hub:<repo>``, fetched with timm's Hugging Face helper
    (the hub's cache, ``HF_HOME`` and ``HF_HUB_OFFLINE`` apply) and read safely."""
    from timm.models import get_pretrained_cfg

    if spec.startswith("hf-hub:"):
        hf_id, url = spec[len("hf-hub:"):], None
        if not hf_id:
            raise ValueError(f"{what} {spec}: name a Hugging Face repository (hf-hub:<org>/<repo>)")
    else:
        name = spec[len("timm:"):]
        cfg = get_pretrained_cfg(name) if name else None
        if cfg is None:
            raise ValueError(f"{what} {spec}: timm has no pretrained weights named {name!r} "
                             "(timm.list_pretrained('vit_*') lists them)")
        hf_id, url = cfg.hf_hub_id, cfg.url
        if getattr(cfg, "file", None):
            return _read_state_file(cfg.file, f"{what} file")
    if hf_id:
        return _read_state_file(_hf_file(hf_id, spec, what), f"{what} file")
    if url:
        from timm.models._hub import download_cached_file

        return _read_state_file(download_cached_file(url), f"{what} file")
    raise ValueError(f"{what} {spec}: timm names no location for these weights")


def _hf_file(hf_id: str, spec: str, what: str) -> str:
    """Local path of the repository's weights: ``model.safetensors``, else ``pytorch_model.bin`` (timm's order)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError
    from timm.models._hub import download_from_hf

    error: Exception | None = None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return download_from_hf(hf_id, filename)
        except EntryNotFoundError as exc:  # absent in the repository, or (offline) in the cache
            error = exc
        except Exception as exc:  # noqa: BLE001 — repository unknown, network down, ...: one line below
            error = exc
            break
    offline = " with HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else ""
    first = str(error).strip().splitlines()[0] if error and str(error).strip() else ""
    raise ValueError(f"{what} {spec}: no weights for {hf_id} on the Hugging Face hub or in its cache "
                     f"({constants.HF_HUB_CACHE}){offline}: {type(error).__name__}: {first}")


# --------------------------------------------------------------------------- sizes


def resolve_size(init: InitWeights, requested: Mapping[str, Any], *, what: str = "--init") -> dict[str, Any]:
    """The target's size: ``requested`` values that are not None, the weights' for the rest.

    Keys: ``model``, ``img_size``, ``patch_size``, ``depth``, ``in_chans`` (+ the decoder keys when
    requested or present in the weights). A requested ``model`` of another width than the weights'
    is a ValueError naming both shapes — nothing can reconcile it.
    """
    found = dict(init.config)
    model = requested.get("model")
    if model is not None and model != found["model"]:
        need = (1, 1, get_size(model).embed_dim)
        raise ValueError(f"{what} {init.spec} holds a {found['model']} encoder (cls_token "
                         f"{tuple(init.state['cls_token'].shape)}); --model {model} needs cls_token {need}: "
                         f"drop --model or pass --model {found['model']}")
    return {**found, **{k: v for k, v in requested.items() if v is not None}}


# --------------------------------------------------------------------------- the mapping


def _unit(key: str) -> str:
    """What a key belongs to, for the summary: ``blocks.3``, ``patch_embed.proj``, ``cls_token``."""
    parts = key.split(".")
    if parts[0] in _BLOCK_LISTS and len(parts) > 1 and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"
    return key.rsplit(".", 1)[0] if parts[-1] in ("weight", "bias") and len(parts) > 1 else key


def group_keys(keys: Collection[str]) -> str:
    """Keys collapsed for one line: ``blocks.0-11``, ``patch_embed.proj``, in first-seen order."""
    units: list[str] = []
    for key in keys:
        u = _unit(key)
        if u not in units:
            units.append(u)
    out: list[str] = []
    runs: dict[str, list[int]] = {}
    for u in units:
        m = re.fullmatch(r"(\w+)\.(\d+)", u)
        if m and m.group(1) in _BLOCK_LISTS:
            if m.group(1) not in runs:
                runs[m.group(1)] = []
                out.append(m.group(1))
            runs[m.group(1)].append(int(m.group(2)))
        else:
            out.append(u)
    for name, idx in runs.items():
        idx.sort()
        spans, start = [], idx[0]
        for a, b in zip(idx, idx[1:] + [None]):
            if b != a + 1:
                spans.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        out[out.index(name)] = f"{name}.{','.join(spans)}"
    return ", ".join(out)


@dataclass
class LoadReport:
    """What :func:`load_init` did with every tensor; :meth:`summary` is the one line to print."""

    spec: str
    kind: str
    target: str
    loaded: list[str] = field(default_factory=list)
    resampled: dict[str, str] = field(default_factory=dict)  # key -> "old -> new"
    recomputed: list[str] = field(default_factory=list)  # fixed sin-cos tables
    kept_init: dict[str, str] = field(default_factory=dict)  # key -> why
    ignored: dict[str, str] = field(default_factory=dict)  # key (file) -> why

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"]
        if self.resampled:
            parts.append("resampled " + ", ".join(f"{k} ({v})" for k, v in self.resampled.items()))
        if self.recomputed:
            parts.append(f"recomputed {', '.join(self.recomputed)} (fixed sin-cos)")
        for label, bucket in (("kept their init", self.kept_init), ("ignored", self.ignored)):
            if bucket:
                by_reason: dict[str, list[str]] = {}
                for key, why in bucket.items():
                    by_reason.setdefault(why, []).append(key)
                parts.append(f"{label}: " + "; ".join(f"{group_keys(ks)} ({why})" for why, ks in by_reason.items()))
        return f"--init {self.spec} ({self.kind}) -> {self.target}: " + "; ".join(parts)


def is_sincos(pos_embed: torch.Tensor) -> bool:
    """True when (1, 1+N, D) ``pos_embed`` is MAE's fixed 2-D sin-cos table (zero CLS row)."""
    n, dim = pos_embed.shape[1] - 1, pos_embed.shape[-1]
    grid = round(n**0.5)
    if grid * grid != n or dim % 4 != 0:
        return False
    return torch.allclose(pos_embed[0].float(), sincos_2d(dim, grid, cls_token=True), atol=1e-3, rtol=0)


def _grid(pos_embed: torch.Tensor) -> int:
    return round((pos_embed.shape[1] - 1) ** 0.5)


def _rename_final_norm(
    state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """File's ``norm.*`` / ``fc_norm.*`` under whichever of the two the target has as a real layer."""
    name = "fc_norm" if "fc_norm.weight" in target else "norm"
    out = {}
    for key, value in state.items():
        head = key.split(".", 1)[0]
        out[name + key[len(head):] if head in ("norm", "fc_norm") else key] = value
    return out


def _why_unplaced(key: str, target: Mapping[str, torch.Tensor], what: str) -> str | None:
    head = key.split(".", 1)[0]
    if head == "head":
        return f"the {what} has no classifier head"
    if head in _DECODER_HEADS and not any(k.startswith("decoder_") for k in target):
        return f"the {what} has no decoder"
    parts = key.split(".")
    if head in _BLOCK_LISTS and len(parts) > 2 and parts[1].isdigit() and int(parts[1]) >= _num_blocks(target, head):
        n = _num_blocks(target, head)
        return f"the {what} has {n} {head.replace('_', ' ')[:-1] if n == 1 else head.replace('_', ' ')}"
    return None


def load_init(
    module: nn.Module,
    init: InitWeights,
    *,
    target: str,
    fixed_sincos: Collection[str] = (),
    what: str = "--init",
) -> LoadReport:
    """Load ``init`` into ``module`` (the MAE, or the classifier's timm ViT); return the report.

    ``fixed_sincos``: buffers of ``module`` holding fixed sin-cos tables — never loaded, they are
    already computed for the module's grid (a learned table in the file is ignored with a note).
    Learned ``pos_embed`` of another grid: a sin-cos table in the file is recomputed for the new grid,
    anything else resampled (``resample_abs_pos_embed``). ``patch_embed.proj.weight`` of another
    patch size: ``resample_patch_embed``. A ``head`` of another class count and a ``decoder_pred``
    for another patch size keep the module's initialisation. Any other shape difference, or a file
    tensor the module has no place for (a ViT variant with parts amgsn does not build), is a
    ValueError naming the tensor and both shapes.
    """
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    target_sd = module.state_dict()
    noun = target.split(" (")[0].split(" ")[-1]  # "vit_tiny MAE (64 px, ...)" -> "MAE"
    source = _rename_final_norm(init.state, target_sd)
    report = LoadReport(init.spec, init.kind, target)
    load: dict[str, torch.Tensor] = {}
    unplaced: list[str] = []
    for key, value in source.items():
        if key not in target_sd:
            why = _why_unplaced(key, target_sd, noun)
            if why is None:
                unplaced.append(key)
            else:
                report.ignored[key] = why
            continue
        want = target_sd[key]
        if key in fixed_sincos:
            if is_sincos(value):
                report.recomputed.append(key)
            else:
                report.ignored[key] = f"a learned table; the {noun} keeps fixed sin-cos positions"
            continue
        if value.shape == want.shape:
            load[key] = value
        elif key == "pos_embed" and value.shape[-1] == want.shape[-1]:
            old, new = _grid(value), _grid(want)
            if is_sincos(value):
                load[key] = sincos_2d(want.shape[-1], new, cls_token=True)[None].to(value.dtype)
                report.resampled[key] = f"sin-cos recomputed, {old}x{old} -> {new}x{new} grid"
            else:
                load[key] = resample_abs_pos_embed(value.float(), [new, new], [old, old], num_prefix_tokens=1)
                report.resampled[key] = f"{old}x{old} -> {new}x{new} grid"
        elif key == "patch_embed.proj.weight" and value.shape[:2] == want.shape[:2]:
            load[key] = resample_patch_embed(value.float(), list(want.shape[-2:]))
            report.resampled[key] = f"{value.shape[-1]} -> {want.shape[-1]} px patches"
        elif key.startswith("head.") and value.shape[1:] == want.shape[1:]:
            report.ignored[key] = f"{value.shape[0]} classes in the file, {want.shape[0]} here: re-initialised"
        elif key.startswith("decoder_pred.") and value.shape[1:] == want.shape[1:]:
            report.ignored[key] = "predicts another patch size: re-initialised"
        else:
            raise ValueError(f"{what} {init.spec}: {key} is {tuple(value.shape)} in the {init.kind}, the {target} "
                             f"needs {tuple(want.shape)}")
    if unplaced:
        raise ValueError(f"{what} {init.spec}: the {target} has no place for {group_keys(unplaced)} "
                         f"({len(unplaced)} tensors of the {init.kind}; a ViT variant amgsn does not build)")
    for key in target_sd:
        if key in load or key in fixed_sincos or key in report.ignored:
            continue
        report.kept_init[key] = "not in the file"
    result = module.load_state_dict(load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # every key was checked against target_sd
    report.loaded = sorted(load)
    return report

