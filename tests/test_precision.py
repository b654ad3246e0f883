"""Issue 23 item 7 — the precision contract (docs/method.md §3.9): every masking op computes and
accumulates in at least its input's precision (float64 stays float64), and every differentiable op
passes a float64 ``gradcheck`` at default tolerances.

The same tests run on both CPU routes: here on the C++ kernels, and through the Triton launchers (the
CUDA route, interpreted) in a subprocess with AMGSN_TRITON_ON_CPU=1 TRITON_INTERPRET=1 — together with
the op-only tests of test_dropin.py (``test_on_the_triton_route`` below)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from amgsn import ops
from amgsn.ops import masking
from amgsn.ops import reference as ref

F64 = torch.float64
# On the Triton route every launch is interpreted (~50 ms): there gradcheck runs in fast mode — the same
# Jacobian against finite differences, at the same default tolerances, projected on random vectors
# (one backward and two forward passes instead of one per element). The C++ route checks every element.
FAST = masking.TRITON_ON_CPU


def _selection(B: int, N: int, gen: torch.Generator) -> ref.MaskSelection:
    r = torch.rand(B, generator=gen, dtype=F64)
    r[0], r[-1] = 0.0, 1.0  # keep all / keep one
    return ops.abmg_select(torch.rand(B, N, generator=gen), r)


def test_route_is_the_sessions():
    assert masking.TRITON_ON_CPU == (os.environ.get("AMGSN_TRITON_ON_CPU") == "1")


# ---------------------------------------------------------------------------------------------
# gradcheck in float64, default tolerances, every differentiable op
# ---------------------------------------------------------------------------------------------


def test_gradcheck_gather_visible(seed):
    gen = torch.Generator().manual_seed(seed)
    sel = _selection(3, 7, gen)
    x = torch.randn(3, 4, 7, dtype=F64, generator=gen).transpose(1, 2).requires_grad_()  # strided
    assert gradcheck(lambda t: ops.gather_visible(t, *sel), (x,), fast_mode=FAST)


@pytest.mark.parametrize("token_shape", ["D", "1x1xD"])
def test_gradcheck_scatter_visible(seed, token_shape):
    gen = torch.Generator().manual_seed(seed)
    B, N, D = 3, 7, 4
    sel = _selection(B, N, gen)
    y = torch.randn(int(sel.cu_seqlens[-1]), D, dtype=F64, generator=gen, requires_grad=True)
    shape = (D,) if token_shape == "D" else (1, 1, D)
    token = torch.randn(shape, dtype=F64, generator=gen, requires_grad=True)
    assert gradcheck(lambda a, b: ops.scatter_visible(a, *sel, mask_token=b), (y, token), fast_mode=FAST)


@pytest.mark.parametrize("relative", [False, True])
def test_gradcheck_abmg_mask_and_gather(seed, relative):
    gen = torch.Generator().manual_seed(seed)
    B, H, N, d, D = 3, 2, 7, 4, 2
    q, k = torch.randn(B, H, d, dtype=F64, generator=gen), torch.randn(B, H, N + 1, d, dtype=F64, generator=gen)
    noise = torch.rand(B, N, dtype=F64, generator=gen)
    x = torch.randn(B, N, D, dtype=F64, generator=gen, requires_grad=True)
    ratio = torch.tensor([0.0, 0.4, 1.0])

    def fused(t):
        return ops.abmg_mask_and_gather(q, k, t, ratio, noise, relative_noise=relative)[0]

    assert gradcheck(fused, (x,), fast_mode=FAST)
    assert gradgradcheck(fused, (x,), fast_mode=FAST)


def test_gradcheck_random_and_attention_masking(seed):
    gen = torch.Generator().manual_seed(seed)
    B, H, L, d, D = 2, 2, 10, 4, 3
    x = torch.randn(B, L, D, dtype=F64, generator=gen, requires_grad=True)
    noise = torch.rand(B, L, dtype=F64, generator=gen)
    q, k = torch.randn(B, H, d, dtype=F64, generator=gen), torch.randn(B, H, L + 1, d, dtype=F64, generator=gen)
    assert gradcheck(lambda t: ops.random_masking(t, 0.6, noise)[0], (x,), fast_mode=FAST)
    assert gradcheck(lambda t: ops.attention_masking(t, q, k, 0.6, noise)[0], (x,), fast_mode=FAST)


def test_gradcheck_to_and_from_padded(seed):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 3, 3, 7, 8], dtype=torch.int32)  # an empty sequence too
    visible = torch.randn(8, 3, dtype=F64, generator=gen, requires_grad=True)
    padded = torch.randn(4, 5, 3, dtype=F64, generator=gen, requires_grad=True)
    assert gradcheck(lambda v: ops.to_padded(v, cu, 5)[0], (visible,), fast_mode=FAST)
    assert gradcheck(lambda p: ops.from_padded(p, cu), (padded,), fast_mode=FAST)


# ---------------------------------------------------------------------------------------------
# float64 stays float64: differences below float32's resolution decide
# ---------------------------------------------------------------------------------------------


def _close_keys(B: int, N: int, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q_cls (B, 1, 2), k (B, 1, 1+N, 2) float64 whose patch logits rise by ``step`` with the index (in a
    shuffled order per image): distinct in float64, all equal once rounded to float32 (1 + step == 1)."""
    order = torch.stack([torch.randperm(N) for _ in range(B)]).to(F64)
    q = torch.zeros(B, 1, 2, dtype=F64)
    q[..., 0] = 1.0
    k = torch.zeros(B, 1, N + 1, 2, dtype=F64)
    k[:, 0, 1:, 0] = 1.0 + order * step
    return q, k, order


def test_scores_float64_computed_in_float64(seed):
    gen = torch.Generator().manual_seed(seed)
    # d = 13: sqrt(d) is inexact (a float32 scale would show) and 13 = 8 lanes + a tail of 5
    q, k = torch.randn(3, 4, 13, dtype=F64, generator=gen), torch.randn(3, 4, 50, 13, dtype=F64, generator=gen)
    got = ops.cls_attention_scores(q, k)
    assert got.dtype == F64
    torch.testing.assert_close(got, ref.cls_attention_scores(q, k), atol=1e-15, rtol=1e-13)
    assert ops.cls_attention_scores(q.float(), k).dtype == F64  # either input float64 -> float64
    assert ops.cls_attention_scores(q.float(), k.float()).dtype == torch.float32
    qc, kc, order = _close_keys(2, 11, 1e-11)
    scores = ops.cls_attention_scores(qc, kc)
    assert torch.equal(scores.argsort(1), order.argsort(1))  # strictly ordered as the logits


def test_fused_and_attention_masking_rank_float64_scores(seed):
    B, N = 3, 12
    q, k, order = _close_keys(B, N, 1e-11)
    x = torch.randn(B, N, 2, dtype=F64)
    removed = order >= N - 8  # the 8 most attended: the largest logits
    visible, sel = ops.abmg_mask_and_gather(q, k, x, 8 / 12)
    assert torch.equal(sel.mask, removed) and torch.equal(visible, x[~removed])
    _, mask, _ = ops.attention_masking(x, q, k, 8 / 12)
    assert torch.equal(mask.bool(), removed)
    # rounded to float32 first, every score ties and the lowest indices would go instead
    _, sel32 = ops.abmg_mask_and_gather(q.float(), k.float(), x, 8 / 12)
    assert not torch.equal(sel32.mask, removed)


@pytest.mark.parametrize("which", ["scores", "noise", "relative"])
def test_selection_ranks_float64_inputs_unrounded(seed, which):
    gen = torch.Generator().manual_seed(seed)
    B, N = 4, 23
    order = torch.stack([torch.randperm(N, generator=gen) for _ in range(B)]).to(F64)
    tiny = 1.0 + order * 1e-12  # distinct in float64, all 1.0 in float32
    if which == "scores":
        scores, noise, rel = tiny, None, False
    elif which == "noise":
        scores, noise, rel = torch.zeros(B, N), tiny, False
    else:  # the score range (1e-11 scale) is taken in float64; noise then reorders within it
        scores, noise, rel = tiny, torch.rand(B, N, dtype=F64, generator=gen), True
    ratio = torch.tensor([0.3, 0.5, 0.7, 0.9])
    got = ops.abmg_select(scores, ratio, noise, relative_noise=rel)
    want = ref.abmg_select(scores, ratio, noise, rel)
    assert torch.equal(got.mask, want.mask) and torch.equal(got.ids_keep, want.ids_keep)
    if which != "relative":  # by hand: the largest values are masked
        keep = (got.cu_seqlens[1:] - got.cu_seqlens[:-1]).long()
        assert torch.equal(got.mask, order >= keep[:, None])
    rounded = ref.abmg_select(scores.float(), ratio, None if noise is None else noise.float(), rel)
    assert not torch.equal(rounded.mask, got.mask)  # the check would catch a float32 round trip


def test_mask_token_gradient_accumulates_in_float64(seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, D = 4, 64, 3
    sel = ops.abmg_select(torch.rand(B, N, generator=gen), 0.9)
    y = torch.randn(int(sel.cu_seqlens[-1]), D, dtype=F64, requires_grad=True)
    token = torch.zeros(D, dtype=F64, requires_grad=True)
    upstream = torch.full((B, N, D), 1e-9, dtype=F64)
    upstream[0, sel.mask[0].nonzero()[0, 0]] = 1.0  # one large term, then many far below its float32 ulp
    (g,) = torch.autograd.grad(ops.scatter_visible(y, *sel, mask_token=token), token, upstream)
    exact = 1.0 + (int(sel.mask.sum()) - 1) * 1e-9
    assert g.dtype == F64
    torch.testing.assert_close(g, torch.full((D,), exact, dtype=F64), atol=1e-14, rtol=0)


def test_fakes_match_float64_kernels():
    sel = ref.abmg_select(torch.rand(2, 9), torch.tensor([0.3, 0.6]))
    q, k = torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 3, 10, 4, dtype=F64)
    torch.library.opcheck(torch.ops.amgsn.cls_attention_scores.default, (q, k))
    torch.library.opcheck(torch.ops.amgsn.cls_attention_scores.default, (q.float(), k))
    grad = torch.randn(2, 9, 4, dtype=F64)
    torch.library.opcheck(torch.ops.amgsn.scatter_visible_backward.default, (grad, sel.ids_keep, sel.cu_seqlens))
    y = torch.randn(int(sel.cu_seqlens[-1]), 4, dtype=F64, requires_grad=True)
    tok = torch.randn(4, dtype=F64, requires_grad=True)
    torch.library.opcheck(torch.ops.amgsn.scatter_visible.default, (y, sel.ids_keep, sel.cu_seqlens, tok, 9))


# ---------------------------------------------------------------------------------------------
# The Triton route: this file and the op-only tests of test_dropin.py, in a subprocess
# ---------------------------------------------------------------------------------------------

# test_dropin.py tests that do not go through the masking ops (timm / MAE modules, compile) stay here.
_NOT_ON_ROUTE = ("on_the_triton_route", "mae_model", "cls_query_keys", "compile", "packed_and_padded")


@pytest.mark.skipif(masking.TRITON_ON_CPU, reason="already on the Triton route")
def test_on_the_triton_route():
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "AMGSN_TRITON_ON_CPU": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
         " and ".join(f"not {name}" for name in _NOT_ON_ROUTE),
         str(tests / "test_precision.py"), str(tests / "test_dropin.py")],
        cwd=tests.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]
