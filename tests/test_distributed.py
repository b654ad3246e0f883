"""Multi-process training on CPU with gloo (docs/method.md §8, issue 8): the MRUS ratio bank stays
identical on every rank, the run matches torchrun's launch, and a dead worker fails the job fast."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain_rank(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from amgsn.engine.pretrain import PretrainConfig, pretrain

    summary = pretrain(PretrainConfig(data_dir=data, out=out, img_size=32, patch_size=8, depth=1, decoder_depth=1,
                                      batch_size=8, epochs=2, abmg_warmup=1, warmup_epochs=1, eta=0.3,
                                      workers=0, progress=False, seed=5))
    torch.save({"bank": summary["ratio_bank"], "step": summary["step"]}, Path(out).parent / f"rank{rank}.pt")


def test_pretrain_ddp_ratio_bank_identical_on_every_rank(tiny_synthetic, tmp_path):
    # Exceptions in a worker are re-raised here by mp.spawn.
    mp.spawn(_pretrain_rank, args=(2, _free_port(), str(tiny_synthetic), str(tmp_path / "run")), nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    bank0, step0 = got[0]["bank"], got[0]["step"]
    bank1, step1 = got[1]["bank"], got[1]["step"]
    assert step0 == step1 == 2 * (64 // 16)  # 64 images, 2 ranks x batch 8 per step
    assert torch.equal(bank0, bank1)
    assert not torch.all(bank0 == 0.75)  # the bank did move, from both ranks' images
    # every image was seen by exactly one rank per epoch: all of them moved away from r0
    assert int((bank0 != 0.75).sum()) == 64
    # rank 0 alone wrote the checkpoints and the log
    assert (tmp_path / "run" / "checkpoint-last.pth").exists()
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2


def _torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}", "-m", "amgsn", *args]


def test_killed_worker_fails_the_job_fast(tiny_synthetic, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _torchrun(["pretrain", "--data-dir", str(tiny_synthetic), "--out", str(out), "--img-size", "32",
                     "--patch-size", "8", "--depth", "1", "--decoder-depth", "1", "--batch-size", "4", "--epochs", "50",
                     "--workers", "0", "--no-progress"])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "log.jsonl").exists():  # training is under way once epoch 0 is logged
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "training did not start"
            time.sleep(0.5)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[1]), signal.SIGKILL)
        start = time.time()
        code = proc.wait(timeout=90)
        elapsed = time.time() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = proc.stdout.read()
    assert code != 0
    assert elapsed < 90
    assert "Signal 9" in output or "SIGKILL" in output or "failed" in output.lower(), output[-2000:]
    assert (out / "checkpoint-last.pth").exists()  # the last good checkpoint is intact


def test_torchrun_cli_pretrain(tiny_synthetic, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(_torchrun(["pretrain", "--data-dir", str(tiny_synthetic), "--out", str(out),
                                     "--img-size", "32", "--patch-size", "8", "--depth", "1", "--decoder-depth", "1",
                                     "--batch-size", "8", "--epochs", "1", "--workers", "0", "--no-progress"]),
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("pre-training done") == 1  # printed by rank 0 only
    assert Path(out / "checkpoint-0.pth").exists()
