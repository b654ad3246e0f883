"""How many dtype-cast calls (``aten::copy_`` / ``aten::_to_copy``) one pre-training step makes under bf16
autocast, eager vs ``--compile`` (issue 24 item 3).

On the GPU the fused ViT-B/16 step spent 9.6 ms in 537 ``copy_`` calls (RESULTS.md, issue 5): autocast
casting each fp32 weight to bf16 at every use, activations at every matmul, gradients back. This counts
the same calls on the CPU under CPU autocast (bf16) with ``torch.profiler`` over one warm step of
``amgsn bench-step``'s fused variant: a proxy — which ops get called does not depend on the device,
and a cast Inductor fuses into a compiled kernel is no longer an aten call on either.

    python benchmarks/count_casts.py --model vit_base --img-size 224 --patch-size 16 --batch-size 4

Prints one JSON object: {"eager": {"autocast": n, "explicit": n, "optimizer": n, "copy_": n}, "compiled": {...},
"config": {...}} (see :func:`count`).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

import amgsn.engine.bench_step as bs


def _chain(event) -> list[str]:
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def count(run: bs._Variant) -> dict[str, int]:
    """Cast and copy calls in one step of ``run`` (after two warm-up steps), by where they come from:

    * ``autocast``: ``aten::_to_copy`` that autocast inserts inside an op (``linear``, ``add``, ...) or the
      backward of such a cast (``ToCopyBackward0``) — what the issue calls per-use casts;
    * ``explicit``: a ``.to()`` the Python code calls itself (indices, masks, the loss in float32);
    * ``optimizer``: under ``Optimizer.step`` (AdamW's per-parameter scalar conversions; the same either way);
    * ``copy_``: every ``aten::copy_`` call (each cast makes one, and ops such as ``addmm`` / ``index_copy``
      copy inside), the number the GPU profile reported.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        run.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run.step()
    out: Counter[str] = Counter()
    for event in prof.events():
        if event.name == "aten::copy_":
            out["copy_"] += 1
        if event.name != "aten::_to_copy":
            continue
        chain = _chain(event)
        if any(name.startswith("Optimizer.step") for name in chain):
            out["optimizer"] += 1
        elif len(chain) <= 1 or chain[1].startswith("##"):  # aten::to called by Python (or a compiled graph)
            out["explicit"] += 1
        else:
            out["autocast"] += 1
    return {k: out[k] for k in ("autocast", "explicit", "optimizer", "copy_")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--variant", default="fused", choices=bs.VARIANTS)
    args = ap.parse_args()
    # The step's autocast, on the CPU: bf16 as on CUDA (bench_step's own helper keeps the CPU in fp32).
    bs.autocast = lambda device: torch.autocast("cpu", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen)
    ratios = torch.rand(args.batch_size, generator=gen, dtype=torch.float64) * 0.4 + 0.5
    out = {"config": vars(args) | {"torch": torch.__version__, "autocast": "cpu bfloat16"}}
    for name, compile in (("eager", False), ("compiled", True)):
        run = bs._Variant(args.variant, args.model, args.img_size, args.patch_size, None, imgs, ratios, (0.5, 0.9),
                          "cpu", 0, compile=compile)
        out[name] = count(run)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
