"""Preemption-safe training (issue 16): SIGTERM / SIGUSR1 finish the current optimizer step, write
checkpoint-last.pth with the position inside the epoch, say where in one line and exit with
128 + the signal; ``--resume`` from there ends bit-identical to a run that was never interrupted —
single process and under torchrun (gloo, CPU). Each run is a real subprocess sent a real signal
(tests/signal_at_step.py) in the middle of an epoch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amgsn.engine import checkpoint as ckpt

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
ENV.pop("SIGNAL_AT_STEP", None)
TINY = ["--img-size", "32", "--batch-size", "8", "--epochs", "2", "--no-progress", "--seed", "3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], *, signal_at: int | None = None, signal_name: str = "SIGTERM", nproc: int = 1,
         signal_rank: int = 0) -> subprocess.CompletedProcess:
    env = dict(ENV)
    if signal_at is not None:
        env.update(SIGNAL_AT_STEP=str(signal_at), SIGNAL_NAME=signal_name, SIGNAL_RANK=str(signal_rank))
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
    return subprocess.run([*launcher, str(HERE / "signal_at_step.py"), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def _assert_same_state(a: dict, b: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        flat_a, flat_b = _flatten(a[key]), _flatten(b[key])
        assert flat_a.keys() == flat_b.keys(), key
        for name, value in flat_a.items():
            other = flat_b[name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), f"{key}/{name} differs"
            else:
                assert value == other, f"{key}/{name}: {value!r} != {other!r}"


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flatten(val, f"{prefix}{key}/").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flatten(val, f"{prefix}{i}/").items()}
    return {prefix: obj}


def _losses(run: Path, *keys: str) -> list[list[float]]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [[r["epoch"], *(r[k] for k in keys)] for r in records]


def _records(run: Path) -> list[dict]:
    """The run's log.jsonl records, less their wall-clock fields."""
    clock = {"seconds", "images_per_s", "finished_at"}
    return [{k: v for k, v in json.loads(line).items() if k not in clock}
            for line in (run / "log.jsonl").read_text().splitlines()]


def _interrupt_and_resume(stage: str, args: list[str], tmp_path: Path, *, signal_at: int, signal_name: str,
                          nproc: int = 1, signal_rank: int = 0) -> tuple[dict, dict, str, Path, Path]:
    """(uninterrupted final state, interrupted + resumed final state, the stop message, the two run
    folders)."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = _run([stage, *args, "--out", str(straight)], nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    cut = _run([stage, *args, "--out", str(stopped)], signal_at=signal_at, signal_name=signal_name, nproc=nproc,
               signal_rank=signal_rank)
    if nproc == 1:
        assert cut.returncode == 128 + getattr(signal, signal_name), cut.stderr[-3000:]
    else:
        assert cut.returncode != 0, cut.stderr[-3000:]
    said = [line for line in cut.stderr.splitlines() if "received, stopped after" in line]
    assert len(said) == 1, cut.stderr[-3000:]  # one line, from rank 0 only
    mid = ckpt.load_checkpoint(stopped / "checkpoint-last.pth", kind=stage)
    assert mid["in_epoch"] is not None and mid["in_epoch"]["batches"] > 0  # inside an epoch, not at its end
    resumed = _run([stage, *args, "--out", str(stopped), "--resume", str(stopped / "checkpoint-last.pth")],
                   nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = ckpt.load_checkpoint(straight / "checkpoint-last.pth", kind=stage)
    b = ckpt.load_checkpoint(stopped / "checkpoint-last.pth", kind=stage)
    assert a["global_step"] == b["global_step"] and b["in_epoch"] is None
    return a, b, said[0], straight, stopped


def test_pretrain_sigterm_mid_epoch_then_resume_is_bit_identical(tiny_synthetic, tmp_path):
    args = ["--data-dir", str(tiny_synthetic), *TINY, "--depth", "1", "--decoder-depth", "1", "--abmg-warmup", "1",
            "--workers", "0"]
    # 64 images / batch 8 = 8 steps per epoch; the signal arrives during step 5: the run finishes
    # step 6 (the next step's all-reduce is where it is noticed) and stops inside epoch 0.
    a, b, said, straight, stopped = _interrupt_and_resume("pretrain", args, tmp_path, signal_at=5,
                                                          signal_name="SIGTERM")
    assert "SIGTERM received, stopped after step 6 (epoch 0, batch 6 of 8)" in said
    _assert_same_state(a, b, ("model", "optimizer", "ratio_bank", "policy"))
    assert _losses(straight, "loss", "ratio_mean", "step") == _losses(stopped, "loss", "ratio_mean", "step")


def test_finetune_sigusr1_mid_epoch_then_resume_is_bit_identical(tiny_synthetic, tmp_path):
    args = ["--data-dir", str(tiny_synthetic), *TINY, "--depth", "1", "--patch-size", "8", "--workers", "1",
            "--val-fraction", "0.1"]
    # 57 training images / batch 8 = 7 steps per epoch; stops after step 10 = epoch 1, batch 3.
    a, b, said, straight, stopped = _interrupt_and_resume("finetune", args, tmp_path, signal_at=9,
                                                          signal_name="SIGUSR1")
    assert "SIGUSR1 received, stopped after step 10 (epoch 1, batch 3 of 7)" in said
    _assert_same_state(a, b, ("model", "optimizer", "center_loss"))
    assert (a["best_metric"], a["best_epoch"]) == (b["best_metric"], b["best_epoch"])
    keys = ("loss", "loss_center", "loss_supcon", "val_mean_class_accuracy")
    assert _losses(straight, *keys) == _losses(stopped, *keys)


@pytest.mark.dist
def test_pretrain_under_torchrun_stops_every_rank_after_the_same_step(tiny_synthetic, tmp_path):
    args = ["--data-dir", str(tiny_synthetic), *TINY, "--batch-size", "4", "--depth", "1", "--decoder-depth", "1",
            "--abmg-warmup", "1", "--workers", "0"]
    # 2 ranks x batch 4: 8 steps per epoch. Only rank 1 gets the signal; rank 0 learns of it in the
    # next step's all-reduce, both finish step 6, rank 0 writes the checkpoint.
    a, b, said, straight, stopped = _interrupt_and_resume("pretrain", args, tmp_path, signal_at=5,
                                                          signal_name="SIGTERM", nproc=2, signal_rank=1)
    assert "stopped after step 6 (epoch 0, batch 6 of 8)" in said
    assert len(a["rng_ranks"]) == 2 and not torch.equal(a["rng_ranks"][0]["torch"], a["rng_ranks"][1]["torch"])
    _assert_same_state(a, b, ("model", "optimizer", "ratio_bank", "rng_ranks"))
    # The epoch log records too (issue 22): the saved sums are over all ranks, so only rank 0 may start
    # from them on resume — restored on every rank, the resumed epoch's loss would count them twice.
    want, got = _records(straight), _records(stopped)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == [0, 1]
    for w, g in zip(want, got):
        differ = {k: (g.get(k), w.get(k)) for k in w.keys() | g.keys() if g.get(k) != w.get(k)}
        assert not differ, f"epoch {w['epoch']} log record, resumed vs uninterrupted: {differ}"


def test_save_every_steps_writes_checkpoint_last_inside_the_epoch(tiny_synthetic, tmp_path, monkeypatch):
    from amgsn.engine.pretrain import PretrainConfig, pretrain

    saved: list[tuple[str, dict | None, int]] = []
    real_save = ckpt.save_atomic

    def record(state, path):
        saved.append((Path(path).name, state["in_epoch"], state["global_step"]))
        return real_save(state, path)

    monkeypatch.setattr(ckpt, "save_atomic", record)
    pretrain(PretrainConfig(data_dir=str(tiny_synthetic), out=str(tmp_path / "run"), img_size=32, patch_size=8,
                            depth=1, decoder_depth=1, batch_size=8, epochs=1, workers=0, progress=False,
                            save_every_steps=3))
    mid = [(name, pos["batches"], step) for name, pos, step in saved if pos is not None]
    assert mid == [("checkpoint-last.pth", 3, 3), ("checkpoint-last.pth", 6, 6)]  # not at 8: the epoch's end
    assert [name for name, pos, _ in saved if pos is None] == ["checkpoint-0.pth", "checkpoint-last.pth"]
    with pytest.raises(ValueError, match="--save-every-steps"):
        PretrainConfig(data_dir="x", out="y", save_every_steps=0).validate()


def test_stop_signals_restore_the_previous_handlers():
    from amgsn.engine.common import StopSignals

    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)  # handled: the process lives on
        assert stop.received == signal.SIGUSR1 and not stop.agreed
        stop.agree([0.0, 1.0])
        assert stop.agreed == signal.SIGUSR1
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before


def test_resuming_inside_an_epoch_needs_the_same_batch_size_and_world():
    from amgsn.engine.common import NonFiniteGuard, resume_inside_epoch

    position = {"epoch": 3, "batches": 5, "sums": [1.0, 2.0], "skipped": 0, "seconds": 1.0, "world_size": 1}
    state = {"args": {"batch_size": 8}, "in_epoch": position, "guard": {"in_a_row": 1, "total": 2}}
    guard = NonFiniteGuard()
    assert resume_inside_epoch(state, guard, 8, "c.pth") == position
    assert (guard.in_a_row, guard.total) == (1, 2)
    with pytest.raises(ValueError, match=r"c\.pth: it stopped inside epoch 3 with batch size 8 x 1 processes, "
                                         r"this run has 4 x 1"):
        resume_inside_epoch(state, NonFiniteGuard(), 4, "c.pth")
    with pytest.raises(ValueError, match="8 x 2 processes"):
        resume_inside_epoch({**state, "in_epoch": {**position, "world_size": 2}}, NonFiniteGuard(), 8, "c.pth")
    assert resume_inside_epoch({**state, "in_epoch": None}, NonFiniteGuard(), 4, "c.pth") is None
