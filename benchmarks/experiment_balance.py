"""Issue 6 §5: does AMGSN's recipe buy balance on the synthetic set?

(a) random-mask MAE pre-training + CE only
(b) ABMG + MRUS pre-training + CE only
(c) ABMG + MRUS pre-training + CE + debiased center + SupCon

Equal epochs, several seeds; (b) and (c) share each seed's pre-training. Prints and writes a JSON
table of overall accuracy, mean class accuracy and std of per-class accuracy (mean ± std over seeds),
and ``OUT/experiment.png``: each recipe's per-class accuracy side by side.

    python benchmarks/experiment_balance.py --out runs/experiment --seeds 0 1 2

Nothing is lost when a run is cut short: ``OUT/experiment.json`` is rewritten after every evaluated
run, and a rerun with the same arguments reuses every finished pre-training and evaluation under
OUT. ``--time-budget MIN`` first times two epochs of the slower pre-training (ABMG+MRUS) and of the
slower fine-tuning (two views + both extra losses), then scales ``--pretrain-epochs`` and
``--finetune-epochs`` by one factor so the whole comparison fits (for a lent GPU with a hard limit);
the plan is kept in ``OUT/calibration/plan.json`` so a rerun continues with the same schedules.
``--stop-at-prior`` ends after the first seed when every run predicted a single class for the whole
test split: a longer schedule is needed before seeds can tell the recipes apart.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from amgsn.cli import none_or_str
from amgsn.data.synthetic import ensure_synthetic
from amgsn.engine.checkpoint import load_checkpoint, write_text_atomic
from amgsn.engine.evaluate import evaluate
from amgsn.engine.finetune import FinetuneConfig, finetune
from amgsn.engine.pretrain import PretrainConfig, pretrain
from amgsn.metrics import aggregate_runs, predicted_classes
from amgsn.viz import plot_runs_per_class

METRICS = ("accuracy", "mean_class_accuracy", "std_per_class_ddof0", "macro_f1")
RECIPES = ("a_random_ce", "b_abmg_mrus_ce", "c_abmg_mrus_full")
CALIBRATION_EPOCHS = 2
BUDGET_MARGIN = 0.1  # the plan aims at 90 % of --time-budget: validation and evaluation are not modelled


def _epochs_done(run: Path) -> int:
    """How many epochs ``run/checkpoint-last.pth`` holds (0 if there is none yet)."""
    last = run / "checkpoint-last.pth"
    return load_checkpoint(last)["epoch"] + 1 if last.exists() else 0


def _run_costs(run: Path, wall_seconds: float) -> tuple[float, float]:
    """-> (fixed seconds, seconds per epoch) of a finished run of >= 2 epochs that took ``wall_seconds``.

    One epoch costs the time between the last two records of its ``log.jsonl`` (training, the
    validation pass and the previous epoch's checkpoints: everything that recurs); what is left of
    the wall time (start-up, the first epoch's warm-up) is fixed.
    """
    lines = (run / "log.jsonl").read_text().splitlines()
    finished = [json.loads(line)["finished_at"] for line in lines if line.strip()]
    per_epoch = finished[-1] - finished[-2]
    return max(wall_seconds - per_epoch * len(finished), 0.0), per_epoch


class Experiment:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.data = Path(args.data_dir) if args.data_dir else self.out / "data"
        self.records: list[dict[str, Any]] = []  # one per evaluated run: seed, recipe, headline metrics
        self.metrics: dict[str, list[dict[str, Any]]] = {name: [] for name in RECIPES}  # full metrics.json

    def _pretrain(self, run: Path, mask_mode: str, seed: int, epochs: int) -> str:
        ckpt = run / "checkpoint-last.pth"
        done = _epochs_done(run)
        if done >= epochs:
            return str(ckpt)  # finished by an earlier call with the same arguments
        a = self.args
        cfg = PretrainConfig(out=str(run), data_dir=str(self.data), mask_mode=mask_mode, seed=seed,
                             img_size=a.image_size, patch_size=8, depth=a.depth, decoder_depth=2, epochs=epochs,
                             batch_size=a.batch_size, blr=a.pretrain_blr, warmup_epochs=1, abmg_warmup=1,
                             workers=a.workers, save_every=epochs, progress=False,
                             resume=str(ckpt) if done else None)
        return pretrain(cfg)["checkpoint"]

    def _finetune(self, run: Path, init: str, recipe: str, seed: int, epochs: int) -> dict[str, Any]:
        """Fine-tune + evaluate on the test split (or reuse a finished run's metrics.json)."""
        a = self.args
        metrics_file = run / "eval" / "metrics.json"
        done = _epochs_done(run)
        if done < epochs:
            full = recipe == "c_abmg_mrus_full"
            resume = str(run / "checkpoint-last.pth") if done else None
            finetune(FinetuneConfig(
                out=str(run), data_dir=str(self.data), init=None if resume else init, resume=resume, seed=seed,
                epochs=epochs, batch_size=a.batch_size, blr=a.finetune_blr, layer_decay=a.layer_decay,
                workers=a.workers, save_every=epochs, progress=False,
                lambda_center=a.lambda_center if full else 0.0, lambda_supcon=a.lambda_supcon if full else 0.0,
                center_weighting=a.center_weighting, cache_images=a.cache_images,
                auto_augment=a.auto_augment, re_prob=a.re_prob,
            ))  # fmt: skip
        elif metrics_file.exists():
            return json.loads(metrics_file.read_text())
        # Model selection on the validation split: the best epoch's weights meet the test split.
        return evaluate(run / "checkpoint-best.pth", "synthetic", self.data, split="test", out=run / "eval",
                        workers=a.workers, progress=False)

    def plan_epochs(self) -> tuple[int, int]:
        """The (pre-training, fine-tuning) epochs to run: as given, or scaled to ``--time-budget``.

        Each run is modelled as fixed cost + epochs x cost per epoch, both measured on a short
        calibration run of the slower variant of each stage (first-use costs such as kernel
        compilation land in the fixed part, so the plan errs on the short side).
        """
        a = self.args
        if a.time_budget is None:
            return a.pretrain_epochs, a.finetune_epochs
        cal = self.out / "calibration"
        plan_file = cal / "plan.json"
        if plan_file.exists():  # a rerun continues with the schedules it started (resumed runs must match)
            plan = json.loads(plan_file.read_text())
            print(f"reusing {plan_file}: {plan}", flush=True)
            return plan["pretrain_epochs"], plan["finetune_epochs"]
        t0 = time.perf_counter()
        init = self._pretrain(cal / "pre_abmg_mrus", "abmg_mrus", 0, CALIBRATION_EPOCHS)
        t1 = time.perf_counter()
        self._finetune(cal / "c_abmg_mrus_full", init, "c_abmg_mrus_full", 0, CALIBRATION_EPOCHS)
        t2 = time.perf_counter()
        pre_fixed, pre_epoch = _run_costs(cal / "pre_abmg_mrus", t1 - t0)
        ft_fixed, ft_epoch = _run_costs(cal / "c_abmg_mrus_full", t2 - t1)
        seeds = len(a.seeds)
        left = a.time_budget * 60 * (1 - BUDGET_MARGIN) - (t2 - t0)
        fixed = seeds * (2 * pre_fixed + 3 * ft_fixed)  # two pre-trainings, three fine-tunings per seed
        per_scale = seeds * (2 * pre_epoch * a.pretrain_epochs + 3 * ft_epoch * a.finetune_epochs)
        scale = max(left - fixed, 0.0) / per_scale
        pre, ft = (max(1, math.floor(scale * e)) for e in (a.pretrain_epochs, a.finetune_epochs))
        print(f"calibration: pre-training {pre_fixed:.1f} s + {pre_epoch:.1f} s/epoch, fine-tuning {ft_fixed:.1f} s "
              f"+ {ft_epoch:.1f} s/epoch; {left / 60:.1f} min left -> {pre} pre-training + {ft} fine-tuning epochs",
              flush=True)
        write_text_atomic(json.dumps({"pretrain_epochs": pre, "finetune_epochs": ft}) + "\n", plan_file)
        return pre, ft

    def write(self, pre_epochs: int, ft_epochs: int) -> dict[str, Any]:
        """Rewrite ``OUT/experiment.json`` (atomically) with every run so far; -> the summary table."""
        table = {name: aggregate_runs(runs) for name, runs in self.metrics.items() if runs}
        doc = {"args": vars(self.args), "pretrain_epochs": pre_epochs, "finetune_epochs": ft_epochs,
               "runs": self.records, "results": table}
        write_text_atomic(json.dumps(doc, indent=2) + "\n", self.out / "experiment.json")
        plot_runs_per_class(table, self.out / "experiment.png")
        return table

    def run(self) -> dict[str, Any]:
        a = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        # Same bytes whatever the number of render processes (docs/method.md §6).
        ensure_synthetic(self.data, a.num_train, a.num_test, image_size=a.image_size, seed=0, workers=a.workers,
                         progress=False)
        pre_epochs, ft_epochs = self.plan_epochs()
        for seed in a.seeds:
            t0 = time.time()
            base = self.out / f"s{seed}"
            pre_random = self._pretrain(base / "pre_random", "random", seed, pre_epochs)
            pre_abmg = self._pretrain(base / "pre_abmg_mrus", "abmg_mrus", seed, pre_epochs)
            inits = {"a_random_ce": pre_random, "b_abmg_mrus_ce": pre_abmg, "c_abmg_mrus_full": pre_abmg}
            for name in RECIPES:
                start = time.time()
                m = self._finetune(base / name, inits[name], name, seed, ft_epochs)
                record = {"seed": seed, "recipe": name, **{k: m[k] for k in METRICS},
                          "predicted_classes": predicted_classes(m), "seconds": round(time.time() - start, 1)}
                self.records.append(record)
                self.metrics[name].append(m)
                self.write(pre_epochs, ft_epochs)
                print(f"seed {seed} {name}: " + ", ".join(f"{k} {m[k]:.4f}" for k in METRICS)
                      + f", predicts {len(record['predicted_classes'])} classes", flush=True)
            print(f"seed {seed} took {(time.time() - t0) / 60:.1f} min", flush=True)
            if a.stop_at_prior and all(len(r["predicted_classes"]) == 1 for r in self.records):
                print(f"every run of seed {seed} predicts a single class: stopping (--stop-at-prior); "
                      f"a longer schedule is needed", flush=True)
                break
        return self.write(pre_epochs, ft_epochs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
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
    ap.add_argument("--pretrain-blr", type=float, default=PretrainConfig.blr)
    ap.add_argument("--finetune-blr", type=float, default=FinetuneConfig.blr)
    ap.add_argument("--layer-decay", type=float, default=FinetuneConfig.layer_decay)
    ap.add_argument("--lambda-center", type=float, default=0.01)
    ap.add_argument("--lambda-supcon", type=float, default=0.1)
    ap.add_argument("--center-weighting", default="inverse")
    ap.add_argument("--auto-augment", type=none_or_str, default=FinetuneConfig.auto_augment,
                    help="fine-tuning's timm RandAugment policy ('none' = off)")
    ap.add_argument("--re-prob", type=float, default=FinetuneConfig.re_prob, help="fine-tuning's random erasing")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-images", action="store_true", help="fine-tuning decodes each image once")
    ap.add_argument("--time-budget", type=float, default=None, metavar="MIN",
                    help="scale both epoch counts (same factor) so the whole comparison fits in MIN minutes")
    ap.add_argument("--stop-at-prior", action="store_true",
                    help="stop after the first seed if every run predicted one class only")
    args = ap.parse_args(argv)
    for name in ("pretrain_epochs", "finetune_epochs", "batch_size", "num_train", "num_test"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.time_budget is not None and args.time_budget <= 0:
        ap.error("--time-budget must be > 0 minutes")

    table = Experiment(args).run()
    print("\n| run | accuracy | mean class acc. | std per class (ddof0) | macro-F1 |\n|---|---|---|---|---|")
    for name, row in table.items():
        # std over seeds (ddof 1); "-" for a single seed
        cells = " | ".join(f"{row[k]['mean']:.4f} ± " + ("-" if row[k]["std"] is None else f"{row[k]['std']:.4f}")
                           for k in METRICS)
        print(f"| {name} | {cells} |")
    return table


if __name__ == "__main__":
    main()
