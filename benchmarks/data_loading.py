"""Data-loading throughput: images/s through a DataLoader with the fine-tune transform, with and
without the in-memory cache of decoded images.

    python benchmarks/data_loading.py [--root DIR] [--size 112] [--workers 2] [--batches 40]

Generates the default synthetic set under ``--root`` when missing. Compare the numbers with a CPU
training step's images/s (``amgsn bench-step``): the loader must not be the bottleneck.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from amgsn.data import build_dataset, build_finetune_transform
from amgsn.data.synthetic import ensure_synthetic


def throughput(ds, batch_size: int, workers: int, batches: int) -> float:
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    n, t0 = 0, None
    for _epoch in range(100):
        for i, (x, _, _) in enumerate(loader):
            if t0 is None and i == 2:  # skip worker start-up and the first batches
                t0, n = time.perf_counter(), 0
            n += x.shape[0]
            if t0 is not None and n >= batches * batch_size:
                return n / (time.perf_counter() - t0)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/synthetic")
    p.add_argument("--size", type=int, default=112, help="transform output size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=40, help="timed batches per configuration")
    args = p.parse_args()
    torch.set_num_threads(1)
    root = ensure_synthetic(args.root)
    tf = build_finetune_transform(args.size)
    for cache in (False, True):
        t0 = time.perf_counter()
        ds = build_dataset("synthetic", root, "train", transform=tf, cache=cache)
        build_s = time.perf_counter() - t0
        ips = throughput(ds, args.batch_size, args.workers, args.batches)
        print(f"cache={cache!s:<5} workers={args.workers} size={args.size}: {ips:8.0f} images/s "
              f"(dataset built in {build_s:.1f} s)")


if __name__ == "__main__":
    main()
