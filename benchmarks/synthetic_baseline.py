"""How hard is the synthetic FER set? Train a small CNN from scratch (plain cross-entropy, CPU,
a couple of minutes) on the generated train split and report test accuracy overall, per class,
per intensity bin, and the confusion matrix.

    python benchmarks/synthetic_baseline.py [--root DIR] [--epochs 12] [--size 64] [--json out.json]

Generates the default set (2 500 / 700 images, 112 px, seed 0) under ``--root`` when missing.
The numbers go into benchmarks/RESULTS.md. docs/method.md §6 asks for: well below 100 %, a visible gap
between frequent and rare classes, confusions along fear/surprise, disgust/anger, sadness/neutral.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from amgsn.data import build_dataset
from amgsn.data.synthetic import ensure_synthetic, read_meta


def _tensors(ds, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode once, resize to ``size``, keep everything as one uint8 tensor (fast epochs)."""
    imgs = [np.asarray(ds.load_image(i).resize((size, size), 3)) for i in range(len(ds))]  # 3 = BICUBIC
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(ds.targets)


def _net(num_classes: int) -> nn.Module:
    """A small VGG-style CNN (~0.4 M parameters); a strided 5x5 stem keeps a CPU epoch short."""

    def cbr(i: int, o: int, stride: int = 1, k: int = 3) -> list[nn.Module]:
        return [nn.Conv2d(i, o, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    return nn.Sequential(*cbr(3, 24, 2, 5), *cbr(24, 48), nn.MaxPool2d(2), *cbr(48, 96), nn.MaxPool2d(2),
                         *cbr(96, 144), nn.MaxPool2d(2), *cbr(144, 192), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(192, num_classes))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random flip and a random 0..4 px translation (pad + crop) on a uint8 batch."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = 4
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    return xp[:, :, dy: dy + x.shape[2], dx: dx + x.shape[3]]


def _norm(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255.0 - 0.5) / 0.25


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/synthetic", help="synthetic set (generated when missing)")
    p.add_argument("--num-train", type=int, default=2500)
    p.add_argument("--num-test", type=int, default=700)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--size", type=int, default=64, help="train / test resolution (images are resized)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    root = ensure_synthetic(args.root, args.num_train, args.num_test)
    train, test = build_dataset("synthetic", root, "train"), build_dataset("synthetic", root, "test")
    xtr, ytr = _tensors(train, args.size)
    xte, yte = _tensors(test, args.size)
    classes = train.classes
    model = _net(len(classes))
    steps = args.epochs * ((len(xtr) + args.batch_size - 1) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        total = 0.0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i: i + args.batch_size]
            loss = F.cross_entropy(model(_norm(_augment(xtr[idx], g))), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {total / len(xtr):.3f} ({time.perf_counter() - t0:.0f} s)")
    train_s = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(_norm(xte[i: i + 256])).argmax(1) for i in range(0, len(xte), 256)])
        train_pred = torch.cat([model(_norm(xtr[i: i + 256])).argmax(1) for i in range(0, len(xtr), 256)])
    train_acc = float((train_pred == ytr).double().mean())
    k = len(classes)
    cm = torch.zeros(k, k, dtype=torch.long)
    cm.index_put_((yte, pred), torch.ones_like(yte), accumulate=True)
    per_class = (cm.diag().double() / cm.sum(1).clamp_min(1).double()).tolist()
    acc = float(cm.diag().sum()) / float(cm.sum())
    # Accuracy by intensity (the expression strength the generator drew), non-neutral test images.
    meta = {r["name"]: r for r in read_meta(root) if r["split"] == "test"}
    names = [os.path.basename(test.source(i)).replace("_aligned", "") for i in range(len(test))]
    inten = np.array([float(meta[n]["intensity"]) for n in names])
    correct = (pred == yte).numpy()
    emo = yte.numpy() != classes.index("Neutral")
    bins = [(0.0, 0.35), (0.35, 0.65), (0.65, 1.01)]
    by_int = {f"{lo:.2f}-{min(hi, 1):.2f}": float(correct[emo & (inten >= lo) & (inten < hi)].mean())
              for lo, hi in bins}
    result = {
        "model": "5-conv CNN (from scratch, plain CE)", "epochs": args.epochs, "size": args.size,
        "train_images": len(xtr), "test_images": len(xte), "train_seconds": round(train_s, 1),
        "threads": args.threads, "train_accuracy": train_acc, "accuracy": acc,
        "mean_class_accuracy": float(np.mean(per_class)),
        "std_class_accuracy": float(np.std(per_class)),
        "per_class": dict(zip(classes, per_class)), "train_counts": train.class_counts,
        "test_counts": test.class_counts, "accuracy_by_intensity": by_int, "confusion": cm.tolist(),
    }
    print(f"\ntest accuracy {acc:.3f}, mean class accuracy {np.mean(per_class):.3f}, "
          f"std {np.std(per_class):.3f}; train accuracy {train_acc:.3f} ({train_s:.0f} s, {args.threads} threads)")
    print(f"{'class':<10} {'train n':>7} {'test n':>6} {'acc':>6}")
    for c, n_tr, n_te, a in zip(classes, train.class_counts, test.class_counts, per_class):
        print(f"{c:<10} {n_tr:>7} {n_te:>6} {a:>6.3f}")
    print("accuracy by intensity (non-neutral):", {k_: round(v, 3) for k_, v in by_int.items()})
    print("confusion (rows = true, cols = predicted):")
    print(" " * 10 + "".join(f"{c[:5]:>6}" for c in classes))
    for c, row in zip(classes, cm.tolist()):
        print(f"{c:<10}" + "".join(f"{v:>6}" for v in row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
