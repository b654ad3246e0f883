"""Where the saliency bank's agreement goes (issue 19): from a pre-training checkpoint written with
``--saliency-refresh P < 1``, the Spearman agreement on the run's probe batch of

* ``logged``     — the checkpoint's bank vs a fresh teacher pass on the probe views (what log.jsonl holds);
* ``no_stale``   — a bank rewritten *now* for every image, each from ``--views`` training views of its own
                   (so no staleness: what is left is the view-dependence of the teacher and the warping);
* ``whole``      — a bank written now from each probe image whole (the view (0, 0, 1, 1), unflipped:
                   what the training loop refreshes from);
* ``round_trip`` — each probe view written into an empty bank and read back on the same view (the
                   warping / resampling alone).

    python benchmarks/saliency_agreement.py runs/p025/checkpoint-last.pth --data-dir DATA [--views 2]
"""

from __future__ import annotations

import argparse
import json

import torch

from amgsn.engine.checkpoint import load_checkpoint
from amgsn.engine.common import SeededItems
from amgsn.engine.pretrain import PretrainConfig, _load_train_set, _saliency_probe
from amgsn.masking import MaskingPolicy, SaliencyBank, spearman
from amgsn.masking.saliency_bank import IDENTITY_VIEW
from amgsn.models import MaskedAutoencoderViT


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--views", type=int, default=1, help="training views per image for no_stale")
    args = ap.parse_args(argv)
    state = load_checkpoint(args.checkpoint, kind="pretrain")
    cfg = PretrainConfig(**{**state["args"], "data_dir": args.data_dir, "resume": None})
    model = MaskedAutoencoderViT(**state["model_config"])
    model.load_state_dict(state["model"])
    model.eval()
    dataset = _load_train_set(cfg)
    policy = MaskingPolicy(cfg.mask_mode, epochs=cfg.epochs, impl=cfg.impl)
    grid = cfg.img_size // cfg.patch_size
    logged = SaliencyBank(len(dataset), grid, cfg.saliency_refresh)
    logged.load_state_dict(state["saliency_bank"])
    probe = _saliency_probe(dataset, cfg.seed, "cpu")
    idx, imgs, views = probe
    fresh = policy.teacher_scores(model, imgs)
    seen = logged.seen(idx)
    out = {"checkpoint": args.checkpoint, "epoch": state["epoch"],
           "logged": float(spearman(logged.read(idx, views), fresh)[seen].mean())}
    # no_stale: every probe image rewritten from its own training views (seeded like epoch keys 10_000+).
    now = SaliencyBank(len(dataset), grid, cfg.saliency_refresh)
    items = SeededItems(dataset, cfg.seed)
    with torch.no_grad():
        for v in range(args.views):
            pairs = [items[(10_000 + v, int(i))][0] for i in idx]  # (view, box+flip, whole)
            x, vw = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            now.write(idx, policy.teacher_scores(model, x), vw)
    out["no_stale"] = float(spearman(now.read(idx, views), fresh).mean())
    whole_imgs = torch.stack([items[(-1, int(i))][0][2] for i in idx])
    whole = SaliencyBank(len(dataset), grid, cfg.saliency_refresh)
    identity = torch.tensor([IDENTITY_VIEW] * len(idx))
    whole.write(idx, policy.teacher_scores(model, whole_imgs), identity)
    out["whole"] = float(spearman(whole.read(idx, views), fresh).mean())
    trip = SaliencyBank(len(dataset), grid, cfg.saliency_refresh)
    trip.write(idx, fresh, views)
    out["round_trip"] = float(spearman(trip.read(idx, views), fresh).mean())
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
