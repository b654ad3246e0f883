"""The ``amgsn`` command line. This module only parses arguments and calls ``amgsn.engine`` /
``amgsn.data``; each sub-command is one ``_add_<name>`` function that registers its parser and
sets ``func`` to a small runner (imports are deferred so ``amgsn --help`` is fast)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amgsn",
        description="AMGSN for facial expression recognition: pre-train (ABMG + MRUS), fine-tune "
        "(CE + debiased center + SupCon), evaluate, export.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


_COMMANDS: list = []


def command(fn):
    """Register an ``_add_<name>(subparsers)`` function as a sub-command."""
    _COMMANDS.append(fn)
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


# ---------------------------------------------------------------------------------------------
# pretrain / bench / bench-step / report
# ---------------------------------------------------------------------------------------------


@command
def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="MAE pre-training with ABMG masks and MRUS ratios (DESIGN §4.1-4.2)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="synthetic", help="rafdb | affectnet | fer2013 | ferplus | folder | synthetic")
    p.add_argument("--data-dir", required=True, help="root folder of the data set")
    p.add_argument("--out", required=True, help="output folder (config, log.jsonl, checkpoints, mask gallery)")
    p.add_argument("--model", default="vit_tiny", choices=["vit_tiny", "vit_small", "vit_base"])
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--depth", type=int, default=None, help="encoder depth override (default: the size's)")
    p.add_argument("--decoder-depth", type=int, default=None)
    p.add_argument("--mask-mode", default="abmg_mrus", choices=["random", "abmg", "abmg_mrus"])
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fixed ratio; initial ratio r0 for abmg_mrus")
    p.add_argument("--ratio-min", type=float, default=0.5)
    p.add_argument("--ratio-max", type=float, default=0.9)
    p.add_argument("--eta", type=float, default=0.05, help="MRUS step size")
    p.add_argument("--sigma", type=float, default=0.5, help="ABMG noise on min-max-normalised saliency")
    p.add_argument("--abmg-warmup", type=int, default=None, help="epochs of random masking (default 10%%)")
    p.add_argument("--teacher", default="online", choices=["online", "ema"])
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the teacher (--teacher ema)")
    p.add_argument("--impl", default="fused", choices=["fused", "reference"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base lr: lr = blr x effective batch / 256")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--save-every", type=int, default=1, help="write checkpoint-<epoch>.pth every N epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", default=None, help="checkpoint to resume from")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images/labels (counted, reported)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args) -> int:
    from amgsn.engine.pretrain import PretrainConfig, pretrain

    fields = PretrainConfig.__dataclass_fields__
    cfg = PretrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    summary = pretrain(cfg)
    print(f"pre-training done: loss {summary.get('loss', float('nan')):.4f}, checkpoint {summary['checkpoint']}")
    return 0


@command
def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="operator benchmarks: ours vs the references, one table (+ JSON)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    p.add_argument("--rounds", type=int, default=20, help="timed calls per op (median reported)")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    import json
    from pathlib import Path

    from amgsn.benchmarking import format_table, run_all
    from amgsn.engine.common import resolve_device

    result = run_all(resolve_device(args.device), rounds=args.rounds)
    print(format_table(result))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


@command
def _add_bench_step(sub) -> None:
    p = sub.add_parser("bench-step", help="median pre-training step time: fused vs reference vs plain MAE")
    p.add_argument("--model", default="vit_tiny", choices=["vit_tiny", "vit_small", "vit_base"])
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--ratio-range", type=float, nargs=2, default=(0.5, 0.9), metavar=("LO", "HI"))
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.set_defaults(func=_run_bench_step)


def _run_bench_step(args) -> int:
    import json

    from amgsn.engine.bench_step import bench_step

    result = bench_step(model=args.model, img_size=args.img_size, patch_size=args.patch_size,
                        batch_size=args.batch_size, ratio_range=tuple(args.ratio_range), device=args.device,
                        steps=args.steps, depth=args.depth)
    if args.json:
        print(json.dumps(result))
        return 0
    for name in ("fused", "reference", "mae_random"):
        r = result[name]
        print(f"{name:<11} {r['median_ms']:>10.1f} ms/step  {r['images_per_s']:>8.1f} img/s"
              + (f"  MFU {r['mfu']:.1%}" if "mfu" in r else ""))
    print(f"fused vs reference: {result['fused_speedup_vs_reference']:.2f}x; "
          f"fused / mae_random: {result['fused_over_mae_random']:.2f}")
    return 0


@command
def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write report.html (self-contained) for a run folder")
    p.add_argument("run_dir", help="output folder of pretrain / finetune / evaluate / demo")
    p.add_argument("--out", default=None, help="where to write the HTML (default RUN_DIR/report.html)")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from amgsn.report import build_report

    path = build_report(args.run_dir, args.out)
    print(f"report: {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# make-synthetic
# ---------------------------------------------------------------------------------------------


@command
def _add_make_synthetic(sub) -> None:
    p = sub.add_parser("make-synthetic", help="write the synthetic FER set (RAF-DB layout, DESIGN §6)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", metavar="OUT", help="output folder (EmoLabel/, Image/aligned/)")
    p.add_argument("--num-train", type=int, default=2500, help="training images (RAF-DB class proportions)")
    p.add_argument("--num-test", type=int, default=700, help="test images (identities disjoint from train)")
    p.add_argument("--image-size", type=int, default=112, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--workers", type=int, default=None, help="render processes (default min(2, CPUs); 0 = none)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier synthetic set in OUT")
    p.add_argument("--contact-sheet", default=None, metavar="PNG", help="also write a grid of samples per class")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_run_make_synthetic)


def _run_make_synthetic(args) -> int:
    import time

    from amgsn.data.synthetic import generate

    t0 = time.perf_counter()
    try:
        out = generate(args.out, args.num_train, args.num_test, args.image_size, args.seed,
                       workers=args.workers, overwrite=args.overwrite, progress=args.progress)
    except (ValueError, TypeError, FileExistsError, NotADirectoryError) as e:
        print(f"amgsn make-synthetic: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.num_train} + {args.num_test} images to {out} in {time.perf_counter() - t0:.1f} s")
    if args.contact_sheet:
        from amgsn.data.contact_sheet import contact_sheet

        print(f"contact sheet: {contact_sheet(out, args.contact_sheet)}")
    return 0


@command
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole method on the built-in synthetic set: data, pre-training, "
                       "fine-tuning, evaluation, export, report (<= 15 min on 2 CPU cores; --quick <= 2 min)")
    p.add_argument("--out", default="runs/demo", help="output folder (data, stages, report.html)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    p.add_argument("--data-dir", default=None, help="synthetic set location (default OUT/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from amgsn.engine.demo import DemoConfig, demo

    demo(DemoConfig(out=args.out, quick=args.quick, data_dir=args.data_dir, seed=args.seed, workers=args.workers,
                    device=args.device, progress=args.progress))
    return 0
