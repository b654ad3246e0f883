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


_INIT_HELP = ("pre-trained weights: an MAE checkpoint (mae_pretrain_vit_*.pth / mae_visualize_vit_*.pth), an `amgsn "
              "pretrain` checkpoint, timm weights (.safetensors/.pth), timm:<name.tag> (e.g. "
              "timm:vit_base_patch16_224.mae) or hf-hub:<org>/<repo> (Hugging Face cache; HF_HOME and "
              "HF_HUB_OFFLINE=1 apply). Sizes not given come from the weights; a different image / patch size "
              "resamples them (docs/method.md §10.2)")


def _add_init_and_size(p: argparse.ArgumentParser) -> None:
    """--init and the encoder size of pretrain / finetune: sizes not given come from --init's weights."""
    p.add_argument("--init", default=None, help=_INIT_HELP + "; default: from scratch")
    p.add_argument("--model", default=None, choices=["vit_tiny", "vit_small", "vit_base"],
                   help="default: the --init weights' size, else vit_tiny")
    p.add_argument("--img-size", type=int, default=None, help="default: --init's, else 112")
    p.add_argument("--patch-size", type=int, default=None, help="default: --init's, else 8")
    p.add_argument("--depth", type=int, default=None, help="encoder depth (default: --init's, else the size's)")


def _add_compile(p: argparse.ArgumentParser, shapes: bool = True) -> None:
    """--compile and its options (docs/method.md §9.3)."""
    p.add_argument("--compile", action="store_true",
                   help="regional torch.compile: each kind of block compiled once and shared (docs/method.md §9.3)")
    p.add_argument("--compile-mode", default=None, metavar="MODE",
                   help="torch.compile mode: default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs")
    if shapes:
        p.add_argument("--compile-shapes", default="dynamic", metavar="HOW",
                       help="the packed encoder's token count, new every step: 'dynamic' (one graph for every count) "
                            "or 'bucket' (padded to one of 3 sizes)")


@command
def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="MAE pre-training with ABMG masks and MRUS ratios (docs/method.md §4.1-4.2)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="synthetic", help="rafdb | affectnet | fer2013 | ferplus | folder | synthetic")
    p.add_argument("--data-dir", required=True, help="root folder of the data set")
    p.add_argument("--out", required=True, help="output folder (config, log.jsonl, checkpoints, mask gallery)")
    _add_init_and_size(p)
    p.add_argument("--decoder-depth", type=int, default=None, help="default: --init's decoder, else the size's")
    p.add_argument("--mask-mode", default="abmg_mrus", choices=["random", "abmg", "abmg_mrus"])
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fixed ratio; initial ratio r0 for abmg_mrus")
    p.add_argument("--ratio-min", type=float, default=0.5)
    p.add_argument("--ratio-max", type=float, default=0.9)
    p.add_argument("--eta", type=float, default=0.05, help="MRUS step size")
    p.add_argument("--ratio-momentum", type=float, default=0.9,
                   help="EMA momentum of MRUS's running mean loss (a slow mean lags a falling loss and "
                        "pushes every ratio up)")
    p.add_argument("--sigma", type=float, default=0.5, help="ABMG noise on min-max-normalised saliency")
    p.add_argument("--abmg-warmup", type=int, default=None, help="epochs of random masking (default 10%%)")
    p.add_argument("--teacher", default="online", choices=["online", "ema"])
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the teacher (--teacher ema)")
    p.add_argument("--impl", default="fused", choices=["fused", "reference"])
    p.add_argument("--saliency-refresh", type=float, default=1.0, metavar="P",
                   help="fraction of each batch the ABMG teacher sees (0 < P <= 1); below 1 the others read their "
                        "saliency from a per-image bank (docs/method.md §4.4); 1 = exact ABMG")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base lr: lr = blr x effective batch / 256")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--save-every", type=int, default=1, help="write checkpoint-<epoch>.pth every N epochs")
    p.add_argument("--save-every-steps", type=int, default=None, metavar="N",
                   help="also write checkpoint-last.pth every N optimizer steps (SIGTERM / SIGUSR1 always save "
                   "after the current step and exit with 128 + the signal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", default=None, help="checkpoint to resume from (also one written inside an epoch)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images/labels (counted, reported)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _add_compile(p)
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args) -> int:
    from amgsn.engine.pretrain import PretrainConfig, pretrain

    fields = PretrainConfig.__dataclass_fields__
    try:
        summary = pretrain(PretrainConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    except _USER_ERRORS as e:
        return _fail("pretrain", e)
    if summary["rank"] != 0:
        return 0
    print(f"pre-training done: loss {summary.get('loss', float('nan')):.4f}, checkpoint {summary['checkpoint']}")
    return 0


@command
def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="operator + pre-training step benchmarks: ours vs the references, "
                                     "one table (+ JSON)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    p.add_argument("--rounds", type=int, default=20, help="timed calls per op (median reported)")
    p.add_argument("--step-steps", type=int, default=5,
                   help="timed pre-training steps per variant for the last row (0 = skip that row)")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    import json
    from pathlib import Path

    from amgsn.benchmarking import format_table, run_all
    from amgsn.engine.common import resolve_device

    if args.step_steps < 0:
        return _fail("bench", ValueError(f"--step-steps must be >= 0, got {args.step_steps}"))
    result = run_all(resolve_device(args.device), rounds=args.rounds, step_steps=args.step_steps)
    print(format_table(result))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


@command
def _add_kernels(sub) -> None:
    p = sub.add_parser("kernels", help="compile every Triton kernel ahead of time for GPU architectures (no GPU "
                                       "needed): registers, spills, shared memory, occupancy, grid (docs/method.md "
                                       "§9.1)")
    p.add_argument("--arch", default=None,
                   help="comma-separated compute capabilities, e.g. 80,90 (default 80,86,89,90, plus the visible "
                        "GPU's)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the rows as JSON here")
    p.add_argument("--jobs", type=int, default=2, help="parallel compiles")
    p.add_argument("--allow-spills", action="store_true", help="exit 0 even when a kernel spills")
    p.add_argument("--no-extension", action="store_true", help="skip the compiled center-loss kernels of amgsn._C")
    p.set_defaults(func=_run_kernels)


def _run_kernels(args) -> int:
    from amgsn.engine import kernel_report

    try:
        archs = kernel_report.parse_archs(args.arch) if args.arch else list(kernel_report.DEFAULT_ARCHS)
    except ValueError as err:
        return _fail("kernels", err)
    if args.arch is None and (own := kernel_report.local_arch()) in kernel_report.ARCHS and own not in archs:
        archs.append(own)
    if args.jobs < 1:
        return _fail("kernels", ValueError(f"--jobs must be >= 1, got {args.jobs}"))
    argv = ["--arch", ",".join(map(str, archs)), "--jobs", str(args.jobs)]
    argv += ["--json", args.json_out] if args.json_out else []
    argv += ["--allow-spills"] if args.allow_spills else []
    argv += ["--no-extension"] if args.no_extension else []
    return kernel_report.run(argv)


@command
def _add_bench_step(sub) -> None:
    p = sub.add_parser("bench-step", help="median pre-training step time: fused, fused + saliency bank, reference, "
                                          "plain MAE")
    p.add_argument("--model", default="vit_tiny", choices=["vit_tiny", "vit_small", "vit_base"])
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--ratio-range", type=float, nargs=2, default=(0.5, 0.9), metavar=("LO", "HI"))
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("--variants", nargs="+", default=None, metavar="V",
                   help="which of fused, fused_bank, reference, mae_random (default: all four)")
    p.add_argument("--saliency-refresh", type=float, default=None, metavar="P",
                   help="fused_bank's refresh fraction (default: amgsn.engine.bench_step.DEFAULT_REFRESH)")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    _add_compile(p)
    p.set_defaults(func=_run_bench_step)


def _run_bench_step(args) -> int:
    import json

    from amgsn.engine.bench_step import VARIANTS, bench_step

    try:
        result = bench_step(model=args.model, img_size=args.img_size, patch_size=args.patch_size,
                            batch_size=args.batch_size, ratio_range=tuple(args.ratio_range), device=args.device,
                            steps=args.steps, depth=args.depth, saliency_refresh=args.saliency_refresh,
                            variants=tuple(args.variants) if args.variants else VARIANTS, compile=args.compile,
                            compile_mode=args.compile_mode, compile_shapes=args.compile_shapes)
    except _USER_ERRORS as e:
        return _fail("bench-step", e)
    if args.json:
        print(json.dumps(result))
        return 0
    for name in (v + suffix for v in VARIANTS for suffix in ("", "_compiled")):
        if name not in result:
            continue
        r = result[name]
        extra = f"  P = {r['saliency_refresh']:g}" if "saliency_refresh" in r else ""
        if "compile_s" in r:
            extra += f"  compile {r['compile_s']:.1f} s, {r['recompiles']} recompiles"
        print(f"{name:<20} {r['median_ms']:>10.1f} ms/step  {r['images_per_s']:>8.1f} img/s"
              + (f"  MFU {r['mfu']:.1%}" if "mfu" in r else "") + extra)
    for suffix in ("", "_compiled"):
        for key, text in (("fused_speedup_vs_reference", "fused vs reference: {:.2f}x"),
                          ("fused_over_mae_random", "fused / mae_random: {:.2f}"),
                          ("reference_over_fused_bank", "reference / fused_bank: {:.2f}"),
                          ("fused_bank_over_mae_random", "fused_bank / mae_random: {:.2f}")):
            if key + suffix in result:
                print(("compiled: " if suffix else "") + text.format(result[key + suffix]))
    for name in VARIANTS:
        if f"{name}_compiled_speedup" in result:
            print(f"{name}: compiled {result[f'{name}_compiled_speedup']:.2f}x eager")
    return 0


@command
def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write report.html (self-contained) for a run folder")
    p.add_argument("run_dir", help="output folder of pretrain / finetune / evaluate / demo")
    p.add_argument("--out", default=None, help="where to write the HTML (default RUN_DIR/report.html)")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from amgsn.report import build_report

    try:
        path = build_report(args.run_dir, args.out)
    except _USER_ERRORS as e:
        return _fail("report", e)
    print(f"report: {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# make-synthetic
# ---------------------------------------------------------------------------------------------


@command
def _add_make_synthetic(sub) -> None:
    p = sub.add_parser("make-synthetic", help="write the synthetic FER set (RAF-DB layout, docs/method.md §6)",
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
    p.add_argument("--init", default=None, help="pre-trained weights for the pre-training stage (and so for "
                   "fine-tuning), any `amgsn pretrain --init` SPEC, e.g. timm:vit_tiny_patch16_224.augreg_in21k; "
                   "the model size comes from them, depth / image / patch sizes stay the preset's. Default: none "
                   "(offline, from scratch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from amgsn.engine.demo import DemoConfig, demo

    try:
        demo(DemoConfig(out=args.out, quick=args.quick, data_dir=args.data_dir, seed=args.seed,
                        workers=args.workers, device=args.device, progress=args.progress, init=args.init))
    except _USER_ERRORS as e:
        return _fail("demo", e)
    return 0


# ---------------------------------------------------------------------------------------------
# finetune / evaluate / export / predict
# ---------------------------------------------------------------------------------------------

_USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


def _fail(name: str, err: Exception) -> int:
    print(f"amgsn {name}: error: {err}", file=sys.stderr)
    return 2


def none_or_str(text: str) -> str | None:
    """argparse type of an optional policy string: 'none', 'off' or '' -> None."""
    return None if text.lower() in ("none", "off", "") else text


@command
def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="fine-tune a ViT classifier: CE + debiased center + SupCon (docs/method.md §4.3)")
    p.add_argument("--dataset", default="synthetic", help="rafdb | affectnet | fer2013 | ferplus | folder | synthetic")
    p.add_argument("--data-dir", required=True, help="root folder of the data set (its train split is used)")
    p.add_argument("--out", required=True, help="output folder (config, log.jsonl, checkpoints)")
    _add_init_and_size(p)
    p.add_argument("--global-pool", default="avg", choices=["avg", "token"])
    p.add_argument("--num-classes", type=int, default=None, help="AffectNet / FERPlus: 7 or 8")
    p.add_argument("--classes", default=None, help="folder data sets: comma-separated class names, or a data set "
                   "name whose list to use (e.g. rafdb)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--blr", type=float, default=1e-3, help="base lr: lr = blr x batch x ranks / 256")
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layer-decay", type=float, default=0.65, help="layer-wise lr decay")
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--clip-grad", type=float, default=None, help="gradient norm clip (default: none)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--lambda-center", type=float, default=0.01, help="weight of the debiased center loss (0 = off)")
    p.add_argument("--lambda-supcon", type=float, default=0.1, help="weight of SupCon (0 = off, one view only)")
    p.add_argument("--center-weighting", default="inverse", choices=["inverse", "effective", "none"])
    p.add_argument("--center-alpha", type=float, default=0.5, help="center update rate")
    p.add_argument("--temperature", type=float, default=0.07, help="SupCon temperature")
    p.add_argument("--auto-augment", type=none_or_str, default="rand-m9-mstd0.5-inc1-mmax9",
                   help="timm RandAugment policy ('none' = off)")
    p.add_argument("--re-prob", type=float, default=0.25, help="random erasing probability")
    p.add_argument("--balanced-sampler", action="store_true", help="draw each class equally often")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="stratified validation part of the train split, for model selection (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=1, help="write checkpoint-<epoch>.pth every N epochs")
    p.add_argument("--save-every-steps", type=int, default=None, metavar="N",
                   help="also write checkpoint-last.pth every N optimizer steps (SIGTERM / SIGUSR1 always save "
                   "after the current step and exit with 128 + the signal)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", default=None, help="checkpoint to resume from (same configuration)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images/labels (counted, reported)")
    p.add_argument("--cache-images", action="store_true", help="decode every image once, keep them in memory")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _add_compile(p, shapes=False)
    p.set_defaults(func=_run_finetune)


def _split_classes(text: str | None) -> list[str] | str | None:
    if text is None or "," not in text:
        return text
    return [c.strip() for c in text.split(",") if c.strip()]


def _run_finetune(args) -> int:
    from amgsn.engine.finetune import FinetuneConfig, finetune

    fields = FinetuneConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["classes"] = _split_classes(args.classes)
    try:
        summary = finetune(FinetuneConfig(**values))
    except _USER_ERRORS as e:
        return _fail("finetune", e)
    if summary.get("rank", 0) != 0:
        return 0
    best = summary.get("best_metric")
    best_txt = "" if best is None else f", best val mean class accuracy {best:.4f} (epoch {summary['best_epoch']})"
    print(f"fine-tuning done{best_txt}; checkpoint {summary['checkpoint']}")
    return 0


@command
def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="balanced metrics of a fine-tuned checkpoint on a full split (+ plots)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", default=None, help="finetune checkpoint, run folder or exported .safetensors")
    which.add_argument("--seeds", nargs="+", default=None, metavar="RUN",
                       help="several checkpoints / run folders (one per seed; or their metrics.json): evaluate "
                       "each, then write OUT/summary.json with mean ± std")
    p.add_argument("--dataset", default="synthetic", help="data set name (default: synthetic)")
    p.add_argument("--data-dir", default=None, help="root folder of the data set (not needed for metrics.json runs)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--out", default=None, help="output folder (default: CHECKPOINT_DIR/eval; required with --seeds)")
    p.add_argument("--class-map", default=None, help="'DatasetName=CheckpointName,...' or a JSON file, for data sets "
                   "whose class names differ from the checkpoint's")
    p.add_argument("--num-classes", type=int, default=None, help="AffectNet / FERPlus: 7 or 8")
    p.add_argument("--classes", default=None, help="folder data sets: class names (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from pathlib import Path

    from amgsn.engine.evaluate import evaluate, format_summary, parse_class_map, summarize_runs

    try:
        class_map = parse_class_map(args.class_map)
        classes = _split_classes(args.classes)
        opts = {"class_map": class_map, "num_classes": args.num_classes, "device": args.device,
                "batch_size": args.batch_size, "workers": args.workers, "skip_bad": args.skip_bad,
                "progress": args.progress, "classes": classes}
        if args.checkpoint is not None:
            if args.data_dir is None:
                raise ValueError("--data-dir is required with --checkpoint")
            m = evaluate(args.checkpoint, args.dataset, args.data_dir, args.split, args.out, **opts)
            print(f"accuracy {m['accuracy']:.4f}, mean class accuracy {m['mean_class_accuracy']:.4f}, "
                  f"std per class (ddof 0) {m['std_per_class_ddof0']:.4f}; wrote {m['out']}/metrics.json")
            return 0
        if args.out is None:
            raise ValueError("--out is required with --seeds (where summary.json goes)")
        files = []
        for i, run in enumerate(args.seeds):
            path = Path(run)
            done = path / "metrics.json" if path.is_dir() else path
            if done.name == "metrics.json" and done.is_file():
                files.append(done)  # already evaluated
                continue
            if args.data_dir is None:
                raise ValueError(f"--data-dir is required to evaluate {run}")
            name = path.name if path.is_dir() else f"{path.parent.name}-{path.stem}"
            m = evaluate(run, args.dataset, args.data_dir, args.split, Path(args.out) / f"{i}-{name}", **opts)
            files.append(Path(m["out"]) / "metrics.json")
        summary = summarize_runs(files, args.out)
    except _USER_ERRORS as e:
        return _fail("evaluate", e)
    print(format_summary(summary))
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


@command
def _add_export(sub) -> None:
    p = sub.add_parser("export", help="timm-compatible safetensors of a fine-tuned checkpoint (classes + timm "
                       "model in the metadata)")
    p.add_argument("checkpoint", metavar="CKPT", help="finetune checkpoint or run folder")
    p.add_argument("--out", default=None, help="output file (default: CKPT_DIR/model.safetensors)")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from amgsn.engine.export import export
    from amgsn.engine.inference import resolve_checkpoint

    try:
        out = args.out or resolve_checkpoint(args.checkpoint).parent / "model.safetensors"
        path = export(args.checkpoint, out)
    except _USER_ERRORS as e:
        return _fail("export", e)
    print(f"exported {path}")
    return 0


@command
def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="class probabilities for images (optionally on the largest face)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", required=True, help="finetune checkpoint, run folder or exported .safetensors")
    p.add_argument("--detect-face", action="store_true", help="crop the largest face (OpenCV Haar cascade) first")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_run_predict)


def _run_predict(args) -> int:
    import json

    from amgsn.engine.predict import FaceDetectionUnavailable, format_results, predict

    try:
        results = predict(args.images, args.checkpoint, detect_face=args.detect_face, device=args.device)
    except (*_USER_ERRORS, FaceDetectionUnavailable) as e:
        return _fail("predict", e)
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    # Exit status 1 when some file could not be classified (the others were still printed).
    return 1 if any("error" in r for r in results) else 0
