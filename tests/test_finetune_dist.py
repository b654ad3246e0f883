"""Fine-tuning under torch.distributed (issue 8 §3–§4), on CPU with gloo.

* One DDP step of the real fine-tuning objective (:func:`amgsn.engine.finetune.finetune_loss`:
  CE with label smoothing + debiased center loss + SupCon over two views) on 2 ranks × 8 samples
  gives the gradients, weights and centers of 1 process × 16 samples — and the naive rank-local
  losses demonstrably do not (so the comparison can fail).
* ``amgsn finetune`` and ``amgsn evaluate`` run under ``torchrun --nproc_per_node=2``; evaluation
  of a 27-image split (not divisible by 2) counts every image exactly once and matches one process.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amgsn.engine import distributed

pytestmark = pytest.mark.dist

WORLD = 2
B = 16  # the global batch; rank r takes samples r::WORLD
C = 7
# Uneven training counts -> class weights from 0.06 to 5.7: a local normaliser Σ w would be far off.
COUNTS = [60, 4, 25, 1, 12, 30, 7]
LR = 1e-3 * B / 256  # the engine's lr for a global batch of 16 (blr 1e-3, MAE's linear scaling)
TOL = 1e-5  # issue 8: weights and centers within 1e-5 after one step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg():
    from amgsn.engine.finetune import FinetuneConfig

    # λs well above the defaults so that an error in either term shows clearly in the gradients.
    return FinetuneConfig(data_dir="unused", out="unused", label_smoothing=0.1, lambda_center=0.5,
                          lambda_supcon=0.5, temperature=0.1)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two fixed "views" (B, 3, 32, 32) and labels (B,): class 3 (the rarest, weight ~5.7) only in
    rank 1's half, class 6 only once, so the ranks' Σ w differ a lot."""
    g = torch.Generator().manual_seed(seed)
    view1 = torch.randn(B, 3, 32, 32, generator=g)
    view2 = view1 + 0.3 * torch.randn(B, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 3, 0, 1, 2, 3, 5, 2, 0, 4, 5, 0, 2, 6, 4, 5])
    return view1, view2, labels


def _build(seed: int):
    """The same model / losses / optimiser wherever it is called (all seeded by ``seed``)."""
    from timm.optim import create_optimizer_v2

    from amgsn.losses import DebiasedCenterLoss, SupConLoss
    from amgsn.models import ViTClassifier

    cfg = _cfg()
    torch.manual_seed(seed)
    model = ViTClassifier("vit_tiny", C, img_size=32, patch_size=8, depth=2, drop_path_rate=0.0, proj_dim=16)
    center = DebiasedCenterLoss(C, model.vit.embed_dim, class_counts=COUNTS, alpha=0.5)
    # Centers as after some training (not the initial zeros): the loss then depends on them.
    center.centers.copy_(torch.randn(C, model.vit.embed_dim, generator=torch.Generator().manual_seed(seed)))
    supcon = SupConLoss(temperature=cfg.temperature)
    # The engine's optimiser: AdamW with layer-wise lr decay from timm's factory.
    optimizer = create_optimizer_v2(model, "adamw", lr=LR, weight_decay=0.05, layer_decay=0.65)
    return cfg, model, center, supcon, optimizer


def _step(seed: int, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor) -> dict:
    """One step of the engine's loop body on this process's samples, DDP-wrapped when a process
    group is up: the (averaged) gradients, the loss terms, the weights and centers after it."""
    from torch import nn

    from amgsn.engine.finetune import _TrainForward, finetune_loss

    cfg, model, center, supcon, optimizer = _build(seed)
    step_fn: nn.Module = _TrainForward(model, project=True)
    if dist.is_initialized():
        step_fn = nn.parallel.DistributedDataParallel(step_fn)
    model.train()
    model_out = step_fn(torch.cat([view1, view2]))
    loss, parts = finetune_loss(model_out, labels, center, supcon, cfg)
    out = {"parts": {k: float(v.detach()) for k, v in parts.items()},
           "checked": float(distributed.all_reduce_sum(loss.detach().clone()))}
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    center.update_centers(model_out[0].detach().float(), labels.repeat(2))
    out["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["centers"] = center.centers.clone()
    return out


def _rank_worker(rank: int, port: int, seed: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        from amgsn.engine.common import NonFiniteGuard

        view1, view2, labels = _batch(seed)
        result = _step(seed, view1[rank::WORLD], view2[rank::WORLD], labels[rank::WORLD])
        # The non-finite guard decides on the sum over ranks: a NaN on one rank makes every rank
        # skip the step (else the others would wait in DDP's all-reduce).
        result["nan_skips"] = not NonFiniteGuard().check(torch.tensor(float("nan") if rank == 1 else 1.0), "test")
        result["edges"] = [_center_edge(seed, labels, rank) for labels in EDGE_LABELS]
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# Rank r takes rows r::2. First: rank 0 holds only the weight-0 class (local Σ w = 0, global > 0);
# second: no sample carries weight anywhere (global Σ w = 0).
EDGE_LABELS = (torch.tensor([0, 1, 0, 2, 0, 2]), torch.tensor([0, 0, 0, 0, 0, 0]))
EDGE_WEIGHTS = [0.0, 1.0, 2.5]


def _center_edge(seed: int, labels: torch.Tensor, rank: int | None) -> tuple[float, torch.Tensor]:
    """(loss value, gradient of the features) of DebiasedCenterLoss on rows ``rank::WORLD`` of a
    fixed batch (all rows with ``rank=None``); the gradient of a rank is scaled for DDP's average."""
    from amgsn.losses import DebiasedCenterLoss

    g = torch.Generator().manual_seed(seed)
    feats, centers = torch.randn(labels.numel(), 5, generator=g), torch.randn(3, 5, generator=g)
    m = DebiasedCenterLoss(3, 5, class_weights=EDGE_WEIGHTS)
    m.centers.copy_(centers)
    rows = slice(None) if rank is None else slice(rank, None, WORLD)
    f = feats[rows].clone().requires_grad_()
    loss = m(f, labels[rows])
    loss.backward()
    return float(loss.detach()), f.grad


def _naive_grads(seed: int, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor) -> dict:
    """What DDP averaged before the fix: each rank's center loss normalised by its *local* Σ w and
    SupCon over its own samples only — the mean over the ranks of the per-half gradients."""
    import torch.nn.functional as F

    from amgsn.ops import debiased_center_loss, supcon_loss

    cfg, model, center, _, _ = _build(seed)
    model.train()
    total: dict = {}
    for r in range(WORLD):
        y = labels[r::WORLD]
        pooled, logits = model.forward_features_and_logits(torch.cat([view1[r::WORLD], view2[r::WORLD]]))
        z = F.normalize(model.project(pooled), dim=-1).view(2, y.numel(), -1).transpose(0, 1)
        loss = (F.cross_entropy(logits, y.repeat(2), label_smoothing=cfg.label_smoothing)
                + cfg.lambda_center * debiased_center_loss(pooled, y.repeat(2), center.centers, center.class_weights)
                + cfg.lambda_supcon * supcon_loss(z, y, cfg.temperature))
        model.zero_grad(set_to_none=True)
        loss.backward()
        for n, p in model.named_parameters():
            total[n] = total.get(n, 0) + p.grad / WORLD
    return total


def _gradient_steered(grad: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """Where AdamW's first step ``lr·g/(|g| + 1e-8)`` is set by the gradient rather than by rounding.

    Where the exact gradient is 0 — the attention key bias (softmax ignores a constant added to
    every logit of a row) — both runs hold summation noise of ~1e-9 and the step is noise of up to
    ~0.1·lr, on the 2-process and on the 1-process run alike; such elements are left out (at most
    1 % of the weights, checked by the caller). Buffers have no gradient: all compared.
    """
    if grad is None:
        return torch.ones_like(weight, dtype=torch.bool)
    return grad.abs() > 1e-7


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_ranks_batch_8_equal_one_process_batch_16(seed, tmp_path):
    """The gradients are the sharp check (the first AdamW step moves each weight by about ±lr,
    whatever the gradient's size); weights and centers after the step must agree within 1e-5."""
    mp.spawn(_rank_worker, args=(_free_port(), seed, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        view1, view2, labels = _batch(seed)
        want = _step(seed, view1, view2, labels)
        naive = _naive_grads(seed, view1, view2, labels)
        cfg, initial, initial_center, _, _ = _build(seed)
    finally:
        torch.set_num_threads(threads)

    ref = want["parts"]
    assert ref["center"] > 0 and ref["supcon"] > 0
    # CE is a per-rank mean of equal shares: their mean is the global mean.
    ce = sum(got["parts"]["ce"] for got in ranks) / WORLD
    assert ce == pytest.approx(ref["ce"], rel=1e-5)
    for got in ranks:
        # The center and SupCon values are the global batch's on every rank ...
        assert got["parts"]["center"] == pytest.approx(ref["center"], rel=1e-5)
        assert got["parts"]["supcon"] == pytest.approx(ref["supcon"], rel=1e-5)
        # ... DDP's averaged gradient is the one-process gradient ...
        for name, g in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
        # ... and so are the weights and centers after the step.
        compared = 0
        for name, w in want["weights"].items():
            steered = _gradient_steered(want["grads"].get(name), w)
            compared += int(steered.sum())
            torch.testing.assert_close(got["weights"][name][steered], w[steered], rtol=0, atol=TOL, msg=name)
        assert compared > 0.99 * sum(w.numel() for w in want["weights"].values())
        torch.testing.assert_close(got["centers"], want["centers"], rtol=0, atol=TOL)
        # The guard sees the sum of the ranks' losses: the same number on both; NaN if one is NaN.
        summed = WORLD * (ce + cfg.lambda_center * ref["center"] + cfg.lambda_supcon * ref["supcon"])
        assert got["checked"] == pytest.approx(summed, rel=1e-5)
        assert got["nan_skips"] is True  # both ranks skip, not only the one that saw the NaN
    assert ranks[0]["checked"] == ranks[1]["checked"]
    # The global normaliser's edge cases: a rank with no weighted sample gets a zero gradient but
    # reports the global loss; with no weighted sample anywhere the loss and gradients are 0.
    for e, labels in enumerate(EDGE_LABELS):
        value, grad = _center_edge(seed, labels, None)
        for r, got in enumerate(ranks):
            got_value, got_grad = got["edges"][e]
            assert got_value == pytest.approx(value, rel=1e-6)
            # Without DDP's average: a rank's gradient is WORLD x its rows of the global gradient.
            torch.testing.assert_close(got_grad, WORLD * grad[r::WORLD], rtol=1e-5, atol=1e-7)
        assert (value > 0) == (e == 0)
    assert torch.equal(ranks[0]["edges"][0][1], torch.zeros(3, 5))
    # The step happened: weights moved by ~lr, centers by the Wen update.
    assert _max_diff(want["weights"], initial.state_dict()) > 0.5 * LR
    assert float((want["centers"] - initial_center.centers).abs().max()) > 100 * TOL

    # The check can fail: rank-local normalisation / SupCon give gradients far outside the tolerance.
    scale = max(float(g.abs().max()) for g in want["grads"].values())
    assert _max_diff(naive, want["grads"]) > 1e-2 * scale


# --------------------------------------------------------------------------- torchrun CLI


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
           f"--master_port={_free_port()}", "-m", "amgsn", *args]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _folder_subset(src: Path, dst: Path, n: int) -> None:
    """The first ``n`` test images of the synthetic set as a ``folder`` data set ``dst/test/<class>/``."""
    from amgsn.data import build_dataset

    ds = build_dataset("synthetic", src, "test")
    assert len(ds) > n
    for i in range(n):
        folder = dst / "test" / ds.classes[ds.targets[i]]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(ds.source(i), folder / f"{i:03d}.jpg")


def _predictions(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_torchrun_finetune_then_evaluate_counts_each_image_once(tiny_synthetic, tmp_path):
    from amgsn.engine.evaluate import evaluate

    run = tmp_path / "run"
    done = _torchrun(["finetune", "--data-dir", str(tiny_synthetic), "--out", str(run), "--img-size", "32",
                      "--patch-size", "8", "--depth", "1", "--batch-size", "8", "--epochs", "1", "--workers", "0",
                      "--device", "cpu", "--val-fraction", "0.2", "--warmup-epochs", "0.5", "--seed", "3",
                      "--no-progress"])
    assert "fine-tuning done" in done.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == WORLD
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(records) == 1
    rec = records[0]
    assert rec["step"] == config["num_train"] // (8 * WORLD)  # steps of the global batch of 16
    for key in ("loss", "loss_ce", "loss_center", "loss_supcon"):
        assert 0 < rec[key] < float("inf"), key
    assert (run / "checkpoint-best.pth").exists() and (run / "checkpoint-0.pth").exists()

    n = 27  # not divisible by the 2 ranks
    data = tmp_path / "folder"
    _folder_subset(tiny_synthetic, data, n)
    _torchrun(["evaluate", "--checkpoint", str(run), "--dataset", "folder", "--data-dir", str(data),
               "--out", str(tmp_path / "ev2"), "--batch-size", "4", "--workers", "0", "--device", "cpu",
               "--no-progress"])
    got = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert sum(map(sum, got["confusion_matrix"])) == n
    rows = _predictions(tmp_path / "ev2" / "predictions.csv")
    assert [int(r["index"]) for r in rows] == list(range(n))  # each image once, in data-set order
    assert len({r["source"] for r in rows}) == n

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = evaluate(run, "folder", data, out=tmp_path / "ev1", device="cpu", batch_size=5, workers=0,
                       progress=False)
    finally:
        torch.set_num_threads(threads)
    assert got["confusion_matrix"] == one["confusion_matrix"]
    assert got["accuracy"] == pytest.approx(one["accuracy"])
    assert got["mean_class_accuracy"] == pytest.approx(one["mean_class_accuracy"])
    single = _predictions(tmp_path / "ev1" / "predictions.csv")
    for a, b in zip(rows, single, strict=True):
        assert (a["source"], a["true"], a["predicted"]) == (b["source"], b["true"], b["predicted"])
        assert float(a["confidence"]) == pytest.approx(float(b["confidence"]), abs=1e-5)
