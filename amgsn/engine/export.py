"""Export a fine-tuned classifier as a plain timm state dict in safetensors (issue 6 §4).

The file's metadata says how to rebuild the model without amgsn::

    import json, timm
    from safetensors import safe_open
    from safetensors.torch import load_file
    meta = safe_open("model.safetensors", "pt").metadata()
    model = timm.create_model(meta["timm_model"], num_classes=len(json.loads(meta["classes"])),
                              **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(load_file("model.safetensors"), strict=True)

Metadata (all strings, as safetensors requires): ``timm_model``, ``timm_kwargs`` (JSON),
``classes`` (JSON list, the logits' order), ``mean`` / ``std`` (JSON, the input normalisation),
``format`` (``"amgsn-timm/1"``) and the source checkpoint's epoch. The SupCon projection head is a
training-only part and is not exported.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from amgsn.engine.checkpoint import load_checkpoint
from amgsn.engine.inference import build_classifier_from_state, resolve_checkpoint

FORMAT = "amgsn-timm/1"


def export(checkpoint: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the classifier of a ``finetune`` checkpoint (or run folder) to ``out_path``.

    The export is verified before it is kept: timm rebuilds the model from the metadata and loads
    the weights with ``strict=True``. ValueError when the checkpoint is not a fine-tuning one.
    Returns the written path.
    """
    import timm
    from safetensors.torch import save_file
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    src = resolve_checkpoint(checkpoint)
    state = load_checkpoint(src)
    if state["kind"] != "finetune":
        raise ValueError(f"{src} is a {state['kind']!r} checkpoint; export takes a fine-tuned classifier "
                         "('finetune' checkpoint from `amgsn finetune`)")
    model = build_classifier_from_state(state)
    model.load_state_dict(state["model"])
    name, kwargs = model.timm_spec()
    classes = list(state["classes"])
    # safetensors refuses tensors that share memory or are not contiguous.
    tensors = {k: v.contiguous().clone() for k, v in model.timm_state_dict().items()}
    rebuilt = timm.create_model(name, pretrained=False, num_classes=len(classes), **kwargs)
    rebuilt.load_state_dict(tensors, strict=True)  # raises if the metadata would not rebuild it
    metadata = {
        "format": FORMAT,
        "timm_model": name,
        "timm_kwargs": json.dumps(kwargs, sort_keys=True),
        "classes": json.dumps(classes),
        "mean": json.dumps(list(IMAGENET_DEFAULT_MEAN)),
        "std": json.dumps(list(IMAGENET_DEFAULT_STD)),
        "source_epoch": str(state.get("epoch")),
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, out)  # atomic: a reader never sees half a file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out
