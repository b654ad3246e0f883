"""When does a ViT learn the synthetic FER set? A bare training loop for the diagnoses in RESULTS.md.

The fine-tuning engine's ViT stays at the class prior within the demo's CPU budget (RESULTS.md,
"Fine-tuning on the synthetic set"). This script is the loop those diagnoses ran: the set decoded
once into a uint8 tensor, ``amgsn.models.ViTClassifier`` (timm ViT) trained with AdamW, linear
warm-up + cosine, grad-norm clip 1, plain cross-entropy and optional flip + shift (no engine, no
DataLoader), test accuracy and mean class accuracy after every epoch as one JSON line. Knobs for
what was suspected: pooling, layer decay, init from an ``amgsn pretrain`` checkpoint, mimetic
attention init (Trockman & Kolter 2023), fixed sin-cos position embeddings, a class subset, and
generator variants with a difficulty factor removed (``--variant``; diagnosis only, a new set).

    python benchmarks/vit_learnability.py --root runs/syn64 --epochs 20 --threads 1 > log.jsonl
    python benchmarks/vit_learnability.py --root runs/syn64_clean --variant no-nuisance ...
    python benchmarks/vit_learnability.py --root runs/syn64 --pool max --mimetic ...
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_baseline import _augment, _norm, _tensors  # noqa: E402

import amgsn.data.synthetic as synthetic  # noqa: E402
from amgsn.data import build_dataset  # noqa: E402
from amgsn.data.classes import RAFDB_CLASSES  # noqa: E402
from amgsn.engine.checkpoint import load_checkpoint  # noqa: E402
from amgsn.metrics import classification_metrics, confusion_matrix  # noqa: E402
from amgsn.models import ViTClassifier  # noqa: E402
from amgsn.models.pos_embed import sincos_2d  # noqa: E402

VARIANTS = ("as-is", "no-nuisance", "full-intensity")
POOLS = ("avg", "token", "max", "avgmax")


@contextlib.contextmanager
def generator_variant(name: str) -> Iterator[None]:
    """Swap the generator's samplers while ``synthetic.generate`` runs (workers fork, so they see it).

    ``no-nuisance``: frontal, centred, unit scale, no occluder, blur, noise, low resolution, JPEG
    re-encode or directional light. ``full-intensity``: every non-neutral expression at intensity 1
    (each drawn action unit scaled by 1 / intensity, capped at 1).
    """
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")
    nuisance, expression = synthetic.sample_nuisance, synthetic.sample_expression

    def clean_nuisance(rng):
        return dataclasses.replace(nuisance(rng), yaw=0.0, pitch=0.0, roll=0.0, scale=1.0, shift=(0.0, 0.0),
                                   occluder="", blur=0.0, lowres=1.0, noise=0.0, jpeg_quality=0,
                                   light_strength=0.0, ambient=1.0)

    def full_expression(rng, label, identity):
        ex = expression(rng, label, identity)
        if label == "Neutral":
            return ex
        gain = 1.0 / max(ex.intensity, 1e-3)
        # Only the drawn units (> the 0.04-scale background twitches) are scaled up.
        aus = {au: min(1.0, v * gain) if v > 0.05 else v for au, v in ex.aus.items()}
        return dataclasses.replace(ex, intensity=1.0, aus=aus)

    if name == "no-nuisance":
        synthetic.sample_nuisance = clean_nuisance
    elif name == "full-intensity":
        synthetic.sample_expression = full_expression
    try:
        yield
    finally:
        synthetic.sample_nuisance, synthetic.sample_expression = nuisance, expression


def ensure_set(root: Path, variant: str, num_train: int, num_test: int, image_size: int) -> Path:
    """The set under ``root`` as ``synthetic.ensure_synthetic`` gives it, for this generator variant
    (recorded in ``root/variant.txt``, since ``synthetic.json`` does not know about variants)."""
    root = Path(root)
    marker = root / "variant.txt"
    have = marker.read_text().strip() if marker.exists() else "as-is"
    if (root / synthetic.INFO_FILE).exists():
        marker.write_text(f"{variant} (incomplete)\n")  # matches no variant if we are interrupted below
    with generator_variant(variant):
        if have != variant and (root / synthetic.INFO_FILE).exists():
            synthetic.generate(root, num_train, num_test, image_size, overwrite=True)
        out = synthetic.ensure_synthetic(root, num_train, num_test, image_size)
    marker.write_text(variant + "\n")
    return out


def mimetic_init_(model: ViTClassifier, generator: torch.Generator, alpha: float = 0.7, beta: float = 0.7,
                  alpha_v: float = 0.4, beta_v: float = 0.4) -> None:
    """Mimetic initialisation: per head W_q W_k^T ~ alpha Z + beta I, and W_v W_proj ~ alpha_v Z - beta_v I
    (Z Gaussian / sqrt(D)), so attention starts near what trained ViTs show (Trockman & Kolter 2023)."""

    def factors(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, vh = torch.linalg.svd(m)
        root = s[:rank].sqrt()
        return u[:, :rank] * root, vh[:rank].T * root  # m ~ a @ b.T

    for block in model.vit.blocks:
        attn = block.attn
        dim, heads = attn.qkv.in_features, attn.num_heads
        head_dim = dim // heads
        eye = torch.eye(dim)
        with torch.no_grad():
            w = attn.qkv.weight  # (3 D, D): rows of q, then k, then v
            for h in range(heads):
                rows = slice(h * head_dim, (h + 1) * head_dim)
                z = torch.randn(dim, dim, generator=generator) / math.sqrt(dim)
                a, b = factors(alpha * z + beta * eye, head_dim)
                w[rows] = a.T
                w[dim:][rows] = b.T
            z = torch.randn(dim, dim, generator=generator) / math.sqrt(dim)
            a, b = factors(alpha_v * z - beta_v * eye, dim)
            w[2 * dim:] = a.T
            attn.proj.weight.copy_(b)


def _subset(x: torch.Tensor, y: torch.Tensor, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    sel = torch.isin(y, torch.tensor(keep))
    remap = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(keep)] = torch.arange(len(keep))
    return x[sel], remap[y[sel]]


def _evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict:
    """Test accuracy and mean class accuracy (``amgsn.metrics``, classes without test images left out)."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(_norm(x[i: i + 200])).argmax(1) for i in range(0, len(x), 200)])
    model.train()
    return classification_metrics(confusion_matrix(y, pred, len(classes)), classes)


def build_model(args: argparse.Namespace, num_classes: int) -> ViTClassifier:
    """The ViT-Tiny classifier the arguments ask for: pooling, init checkpoint, mimetic init, sin-cos positions."""
    model = ViTClassifier("vit_tiny", num_classes, img_size=args.size, patch_size=args.patch_size,
                          depth=args.depth, global_pool="token" if args.pool == "token" else "avg",
                          drop_path_rate=args.drop_path)
    if args.pool in ("max", "avgmax"):
        model.vit.global_pool = args.pool  # timm pools by this name; fc_norm stays as for "avg"
    if args.init is not None:
        model.load_pretrain_checkpoint(load_checkpoint(args.init, kind="pretrain"))
    if args.mimetic:
        mimetic_init_(model, torch.Generator().manual_seed(args.seed + 1))
    if args.sincos_pos:
        pos = model.vit.pos_embed
        pos.data.copy_(sincos_2d(pos.shape[-1], args.size // args.patch_size, cls_token=True).reshape(pos.shape))
        pos.requires_grad_(False)
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True, help="synthetic set (generated when missing)")
    p.add_argument("--variant", choices=VARIANTS, default="as-is", help="generator variant, when generating")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-test", type=int, default=600)
    p.add_argument("--gen-size", type=int, default=64, help="image size of a generated set")
    p.add_argument("--size", type=int, default=64, help="training resolution (images are resized)")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--pool", choices=POOLS, default="avg")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layer-decay", type=float, default=None, help="timm's optimizer factory with layer decay")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--no-aug", action="store_true", help="no flip + shift")
    p.add_argument("--init", type=Path, default=None, help="an amgsn pretrain checkpoint (encoder)")
    p.add_argument("--mimetic", action="store_true", help="mimetic attention initialisation")
    p.add_argument("--sincos-pos", action="store_true", help="fixed 2-D sin-cos position embeddings")
    p.add_argument("--classes", default="", help="comma-separated class names: train on this subset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "size", "patch_size", "depth", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size % args.patch_size:
        p.error(f"--size ({args.size}) must be a multiple of --patch-size ({args.patch_size})")
    args.class_subset = [c.strip() for c in args.classes.split(",")] if args.classes else []
    unknown = [c for c in args.class_subset if c not in RAFDB_CLASSES]
    if unknown or len(args.class_subset) == 1:
        p.error(f"--classes must name two or more of {list(RAFDB_CLASSES)}, got {args.classes!r}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    root = ensure_set(args.root, args.variant, args.num_train, args.num_test, args.gen_size)
    train, test = build_dataset("synthetic", root, "train"), build_dataset("synthetic", root, "test")
    xtr, ytr = _tensors(train, args.size)
    xte, yte = _tensors(test, args.size)
    classes = list(train.classes)
    if args.class_subset:
        keep = [classes.index(c) for c in args.class_subset]
        (xtr, ytr), (xte, yte) = _subset(xtr, ytr, keep), _subset(xte, yte, keep)
        classes = args.class_subset
    model = build_model(args, len(classes))
    params = [p for p in model.parameters() if p.requires_grad]
    if args.layer_decay is not None:
        from timm.optim import create_optimizer_v2

        opt = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay,
                                  layer_decay=args.layer_decay)
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(xtr) // args.batch_size
    if steps_per_epoch < 1:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(xtr)} training images")
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup_steps)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    g = torch.Generator().manual_seed(args.seed)
    records, t0 = [], time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(xtr), generator=g)
        loss_sum = correct = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * args.batch_size: (s + 1) * args.batch_size]
            x = xtr[idx] if args.no_aug else _augment(xtr[idx], g)
            logits = model(_norm(x))
            loss = F.cross_entropy(logits, ytr[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            loss_sum += loss.item()
            correct += float((logits.argmax(1) == ytr[idx]).double().mean())
        test = _evaluate(model, xte, yte, classes)
        rec = {"epoch": epoch, "train_loss": round(loss_sum / steps_per_epoch, 4),
               "train_acc": round(correct / steps_per_epoch, 4), "test_acc": round(test["accuracy"], 4),
               "test_mean_class_acc": round(test["mean_class_accuracy"], 4),
               "seconds": round(time.perf_counter() - t0, 1)}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    return records


if __name__ == "__main__":
    main()
