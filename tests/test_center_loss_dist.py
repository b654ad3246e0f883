"""DebiasedCenterLoss under torch.distributed: 2 gloo processes on CPU, each with half of a batch,
must end with the centers a single process computes from the whole batch — on both ranks."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist

WORLD = 2
B_PER_RANK, D, C = 9, 13, 5
STEPS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(seed: int):
    """The global batches of every step (same on every rank); rank r takes rows r::WORLD."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        f = torch.randn(B_PER_RANK * WORLD, D, generator=gen)
        # Class 4 never appears; class 3 only in rank 1's rows (odd rows).
        y = torch.randint(0, 3, (B_PER_RANK * WORLD,), generator=gen)
        y[1] = 3
        out.append((f, y))
    return out


def _expected(seed: int) -> torch.Tensor:
    """One process, whole batches, the reference update."""
    from amgsn.ops import reference as ref

    centers = torch.zeros(C, D)
    for f, y in _batches(seed):
        ref.center_update_(f, y, centers, 0.5)
    return centers


def _worker(rank: int, port: int, seed: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        from amgsn.losses import DebiasedCenterLoss

        m = DebiasedCenterLoss(C, D, class_counts=[4, 4, 4, 1, 1], alpha=0.5)
        for f, y in _batches(seed):
            mine_f, mine_y = f[rank::WORLD], y[rank::WORLD]
            m(mine_f, mine_y)  # the forward is rank-local
            m.update_centers(mine_f, mine_y)
        want = _expected(seed)
        torch.testing.assert_close(m.centers, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(m.centers[4], torch.zeros(D))  # never seen: untouched
        gathered = [torch.empty_like(m.centers) for _ in range(WORLD)]
        dist.all_gather(gathered, m.centers)
        assert torch.equal(gathered[0], gathered[1]), "ranks hold different centers"
    finally:
        dist.destroy_process_group()


def test_two_process_update_equals_single_process(seed):
    # Exceptions (and assertion failures) in a worker are re-raised here by mp.spawn.
    mp.spawn(_worker, args=(_free_port(), seed), nprocs=WORLD, join=True)
