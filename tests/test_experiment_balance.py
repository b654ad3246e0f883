"""benchmarks/experiment_balance.py (issue 6 §5): one tiny seed end to end, reuse of finished runs,
the partial results file and the time-budget arithmetic."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "experiment_balance.py"
_spec = importlib.util.spec_from_file_location("experiment_balance", _PATH)
eb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eb)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--data-dir", str(data), "--num-train", "64", "--num-test", "28", "--image-size",
            "32", "--depth", "1", "--pretrain-epochs", "1", "--finetune-epochs", "1", "--batch-size", "16",
            "--workers", "0", "--seeds", "0", *extra]  # fmt: skip


def test_one_seed_end_to_end_then_reused(tiny_synthetic, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    table = eb.main(_args(tiny_synthetic, out))
    assert list(table) == list(eb.RECIPES)
    doc = json.loads((out / "experiment.json").read_text())
    assert [r["recipe"] for r in doc["runs"]] == list(eb.RECIPES)
    for r in doc["runs"]:
        metrics = json.loads((out / "s0" / r["recipe"] / "eval" / "metrics.json").read_text())
        for k in eb.METRICS:
            assert r[k] == metrics[k]
            assert table[r["recipe"]][k] == {"mean": metrics[k], "std": None, "values": [metrics[k]]}  # one seed
        cm = metrics["confusion_matrix"]
        assert r["predicted_classes"] == [c for j, c in enumerate(metrics["classes"]) if any(row[j] for row in cm)]
        assert r["predicted_classes"]
    # (b) and (c) start from the same ABMG+MRUS pre-training, (a) from the random-mask one
    assert (out / "experiment.png").read_bytes().startswith(b"\x89PNG")
    inits = {name: json.loads((out / "s0" / name / "config.json").read_text())["init"] for name in eb.RECIPES}
    assert inits["b_abmg_mrus_ce"] == inits["c_abmg_mrus_full"] != inits["a_random_ce"]

    # A second call with the same arguments trains nothing and gives the same table.
    def refuse(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(eb, "pretrain", refuse)
    monkeypatch.setattr(eb, "finetune", refuse)
    monkeypatch.setattr(eb, "evaluate", refuse)
    assert eb.main(_args(tiny_synthetic, out)) == table


def test_finished_training_without_metrics_is_evaluated_not_retrained(tiny_synthetic, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    eb.main(_args(tiny_synthetic, out))
    (out / "s0" / "b_abmg_mrus_ce" / "eval" / "metrics.json").unlink()  # e.g. cut off during evaluation
    evaluated = []
    real_evaluate = eb.evaluate
    monkeypatch.setattr(eb, "pretrain", lambda *a, **k: pytest.fail("pre-training rerun"))
    monkeypatch.setattr(eb, "finetune", lambda *a, **k: pytest.fail("fine-tuning rerun"))
    def spy(ckpt, *a, **k):
        evaluated.append(Path(ckpt))
        return real_evaluate(ckpt, *a, **k)

    monkeypatch.setattr(eb, "evaluate", spy)
    eb.main(_args(tiny_synthetic, out))
    assert evaluated == [out / "s0" / "b_abmg_mrus_ce" / "checkpoint-best.pth"]


def test_fine_tuning_knobs_reach_every_recipe(tmp_path, monkeypatch):
    configs = []
    monkeypatch.setattr(eb, "finetune", configs.append)
    monkeypatch.setattr(eb, "evaluate", lambda *a, **k: {})
    args = eb.argparse.Namespace(
        out=str(tmp_path), data_dir=None, batch_size=32, finetune_blr=2e-3, layer_decay=0.75, workers=0,
        lambda_center=0.02, lambda_supcon=0.3, center_weighting="effective", cache_images=True,
        auto_augment=None, re_prob=0.0,
    )  # fmt: skip
    exp = eb.Experiment(args)
    for recipe in eb.RECIPES:
        exp._finetune(tmp_path / recipe, "init.pth", recipe, 3, 5)
    for cfg in configs:
        assert (cfg.auto_augment, cfg.re_prob, cfg.blr, cfg.layer_decay, cfg.seed, cfg.epochs, cfg.init) == (
            None, 0.0, 2e-3, 0.75, 3, 5, "init.pth")
    assert [(c.lambda_center, c.lambda_supcon) for c in configs] == [(0.0, 0.0), (0.0, 0.0), (0.02, 0.3)]
    args.auto_augment = "rand-m5-n1"
    exp._finetune(tmp_path / "again", "init.pth", eb.RECIPES[0], 0, 1)
    assert configs[-1].auto_augment == "rand-m5-n1"


def test_time_budget_scales_both_schedules_by_one_factor(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(eb.time, "perf_counter", lambda: clock[0])
    args = eb.argparse.Namespace(time_budget=10.0, pretrain_epochs=8, finetune_epochs=12, seeds=[0, 1],
                                 out=str(tmp_path), data_dir=None)
    exp = eb.Experiment(args)

    def fake_run(run: Path, fixed: float, first: float, later: float) -> None:
        # a run costs `fixed` seconds before its epochs; its first epoch is slower (warm-up)
        run.mkdir(parents=True, exist_ok=True)
        clock[0] += fixed
        records = []
        for seconds in [first] + [later] * (eb.CALIBRATION_EPOCHS - 1):
            clock[0] += seconds
            records.append(json.dumps({"finished_at": 1.7e9 + clock[0]}) + "\n")
        (run / "log.jsonl").write_text("".join(records))

    def fake_pretrain(run, mode, seed, epochs):
        assert (mode, epochs) == ("abmg_mrus", eb.CALIBRATION_EPOCHS)
        fake_run(run, 4.0, 9.0, 3.0)
        return "ckpt"

    def fake_finetune(run, init, recipe, seed, epochs):
        assert (init, recipe, epochs) == ("ckpt", "c_abmg_mrus_full", eb.CALIBRATION_EPOCHS)
        fake_run(run, 1.0, 2.0, 2.0)
        return {}

    exp._pretrain, exp._finetune = fake_pretrain, fake_finetune
    # calibration: 4 + 9 + 3 + 1 + 2 + 2 = 21 s; left = 600 s x 0.9 - 21 = 519 s. An epoch costs what
    # the last one did (3 s, 2 s); the rest is fixed: 4 + 9 + 3 - 2 x 3 = 10 s and 1 s.
    # fixed per seed 2 x 10 + 3 x 1 = 23 s; per unit of scale 2 x 3 s x 8 + 3 x 2 s x 12 = 120 s (two seeds: x2)
    factor = (519 - 46) / 240
    planned = (int(factor * 8), int(factor * 12))
    assert exp.plan_epochs() == planned
    # a rerun (e.g. after a timeout) keeps the plan its finished and resumable runs were made with
    args.time_budget = 30.0
    assert exp.plan_epochs() == planned
    (tmp_path / "calibration" / "plan.json").unlink()
    args.time_budget = 0.2  # less than the calibration and fixed costs: one epoch each, never zero
    assert exp.plan_epochs() == (1, 1)
    args.time_budget = None
    assert exp.plan_epochs() == (8, 12)


def test_auto_augment_off_parses_as_the_cli_does(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(eb.Experiment, "run", lambda self: seen.append(self.args.auto_augment) or {})
    for text, parsed in (("none", None), ("Off", None), ("rand-m5-n1", "rand-m5-n1")):
        eb.main(["--out", str(tmp_path), "--auto-augment", text])
        assert seen[-1] == parsed
    eb.main(["--out", str(tmp_path)])
    assert seen[-1] == eb.FinetuneConfig.auto_augment


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        eb.main(["--out", str(tmp_path), "--finetune-epochs", "0"])
    with pytest.raises(SystemExit):
        eb.main(["--out", str(tmp_path), "--time-budget", "0"])
