"""amgsn.engine.common.TrainLoader: batches that depend only on (seed, epoch) — not on the number of
workers, not on which epochs the loader served before (what exact resume needs) — with the
workers kept across epochs and the training loop's own random streams left alone."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from amgsn.engine.common import TrainLoader


class Draws(Dataset):
    """Item i -> (one draw from each generator an augmentation may use, i)."""

    def __len__(self) -> int:
        return 23  # odd: the last partial batch is dropped

    def __getitem__(self, index: int):
        return torch.tensor([random.random(), float(np.random.rand()), torch.rand(()).item()]), index


def _epochs(loader: TrainLoader, epochs) -> dict[int, list]:
    return {e: [(x.clone(), idx.clone()) for x, idx in loader.epoch(e)] for e in epochs}


def _loader(workers: int, seed: int = 7, **kw) -> TrainLoader:
    return TrainLoader(Draws(), batch_size=4, seed=seed, shuffle=True, drop_last=True, workers=workers, **kw)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(i, j) for (x, i), (y, j) in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_is_the_same_alone_or_after_others(workers):
    run = _epochs(_loader(workers), [0, 1, 2])
    resumed = _epochs(_loader(workers), [2, 1])  # a fresh loader starting at a later epoch
    assert _same(run[2], resumed[2]) and _same(run[1], resumed[1])
    assert len(run[0]) == 23 // 4
    # every epoch a new order and new draws, each item once
    for e in (0, 1, 2):
        ids = torch.cat([i for _, i in run[e]])
        assert len(ids.unique()) == len(ids) == 20
    assert not torch.equal(torch.cat([i for _, i in run[0]]), torch.cat([i for _, i in run[1]]))
    draws0 = {int(i): x for xb, ib in run[0] for x, i in zip(xb, ib)}
    draws1 = {int(i): x for xb, ib in run[1] for x, i in zip(xb, ib)}
    common = set(draws0) & set(draws1)
    assert common and all(not torch.equal(draws0[i], draws1[i]) for i in common)


def test_workers_do_not_change_the_batches():
    in_main = _epochs(_loader(0), [0, 1])
    for workers in (1, 2):
        assert all(_same(in_main[e], batches) for e, batches in _epochs(_loader(workers), [0, 1]).items())
    # another run seed -> other order and other draws
    assert not _same(_epochs(_loader(0), [0])[0], _epochs(_loader(0, seed=8), [0])[0])


def test_main_process_random_streams_are_left_alone():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = random.random(), float(np.random.rand()), torch.rand(()).item()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    _epochs(_loader(0), [0, 1])
    assert (random.random(), float(np.random.rand()), torch.rand(()).item()) == expected


def test_sampler_for_epoch_is_used_per_epoch():
    seen = []

    def every_other(epoch: int):
        seen.append(epoch)
        return list(range(epoch % 2, 23, 2))

    loader = _loader(0, sampler_for_epoch=every_other)
    run = _epochs(loader, [0, 1])
    assert torch.cat([i for _, i in run[0]]).tolist() == list(range(0, 23, 2))  # 12 items: 3 full batches
    assert torch.cat([i for _, i in run[1]]).tolist() == list(range(1, 23, 2))[:8]
    assert seen[-2:] == [0, 1]


def test_workers_persist_across_epochs():
    loader = _loader(2)
    list(loader.epoch(0))
    workers = loader.epoch(1)._iterator._workers  # the iterator (and its processes) of epoch 0
    list(loader.epoch(1))
    assert loader.epoch(2)._iterator._workers == workers
