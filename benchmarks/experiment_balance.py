"""Issue 6 §5: does AMGSN's recipe buy balance on the synthetic set?

(a) random-mask MAE pre-training + CE only
(b) ABMG + MRUS pre-training + CE only
(c) ABMG + MRUS pre-training + CE + debiased center + SupCon

Equal epochs, several seeds; (b) and (c) share each seed's pre-training. Prints and writes a JSON
table of overall accuracy, mean class accuracy and std of per-class accuracy (mean ± std over seeds).

    python benchmarks/experiment_balance.py --out runs/experiment --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from amgsn.data.synthetic import ensure_synthetic
from amgsn.engine.evaluate import evaluate
from amgsn.engine.finetune import FinetuneConfig, finetune
from amgsn.engine.pretrain import PretrainConfig, pretrain

METRICS = ("accuracy", "mean_class_accuracy", "std_per_class_ddof0", "macro_f1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--data-dir", default=None, help="synthetic set (default OUT/data)")
    ap.add_argument("--num-train", type=int, default=2000)
    ap.add_argument("--num-test", type=int, default=600)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--finetune-epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lambda-center", type=float, default=0.01)
    ap.add_argument("--lambda-supcon", type=float, default=0.1)
    ap.add_argument("--center-weighting", default="inverse")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    out = Path(args.out)
    data = Path(args.data_dir) if args.data_dir else out / "data"
    ensure_synthetic(data, args.num_train, args.num_test, image_size=args.image_size, seed=0)
    common_pre = dict(data_dir=str(data), img_size=args.image_size, patch_size=8, depth=args.depth,
                      decoder_depth=2, epochs=args.pretrain_epochs, batch_size=args.batch_size, warmup_epochs=1,
                      abmg_warmup=1, workers=args.workers, progress=False)
    common_ft = dict(data_dir=str(data), epochs=args.finetune_epochs, batch_size=args.batch_size,
                     workers=args.workers, progress=False)
    results: dict[str, list[dict]] = {"a_random_ce": [], "b_abmg_mrus_ce": [], "c_abmg_mrus_full": []}
    for seed in args.seeds:
        t0 = time.time()
        pre_random = pretrain(PretrainConfig(out=str(out / f"s{seed}/pre_random"), mask_mode="random", seed=seed,
                                             **common_pre))["checkpoint"]
        pre_abmg = pretrain(PretrainConfig(out=str(out / f"s{seed}/pre_abmg_mrus"), mask_mode="abmg_mrus", seed=seed,
                                           **common_pre))["checkpoint"]
        plans = {
            "a_random_ce": (pre_random, 0.0, 0.0),
            "b_abmg_mrus_ce": (pre_abmg, 0.0, 0.0),
            "c_abmg_mrus_full": (pre_abmg, args.lambda_center, args.lambda_supcon),
        }
        for name, (init, lc, ls) in plans.items():
            run = out / f"s{seed}/{name}"
            fin = finetune(FinetuneConfig(out=str(run), init=init, lambda_center=lc, lambda_supcon=ls, seed=seed,
                                          center_weighting=args.center_weighting, **common_ft))
            m = evaluate(fin["checkpoint"], "synthetic", data, split="test", out=run / "eval", workers=args.workers,
                         progress=False)
            results[name].append({k: m[k] for k in (*METRICS, "per_class_accuracy")})
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {m[k]:.4f}" for k in METRICS), flush=True)
        print(f"seed {seed} took {(time.time() - t0) / 60:.1f} min", flush=True)

    table = {}
    for name, runs in results.items():
        table[name] = {k: {"mean": statistics.mean(r[k] for r in runs),
                           "std": statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0,
                           "values": [r[k] for r in runs]} for k in METRICS}
        table[name]["per_class_accuracy"] = [r["per_class_accuracy"] for r in runs]
    (out / "experiment.json").write_text(json.dumps({"args": vars(args), "results": table}, indent=2) + "\n")
    print("\n| run | accuracy | mean class acc. | std per class (ddof0) | macro-F1 |\n|---|---|---|---|---|")
    for name, row in table.items():
        cells = " | ".join(f"{row[k]['mean']:.4f} ± {row[k]['std']:.4f}" for k in METRICS)
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
