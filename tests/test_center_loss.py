"""The debiased center loss and center update (amgsn._C, CPU path) against the references in
amgsn/ops/reference.py (distance-matrix loss, index_add update), the torch.library contract
(opcheck, gradcheck, torch.compile), bad input, and the DebiasedCenterLoss module.

The CUDA kernels are covered by the ``cuda``-marked tests at the end (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from amgsn.losses import DebiasedCenterLoss, class_weights_from_counts
from amgsn.ops import reference as ref
from amgsn.ops.center_loss import (
    center_apply_,
    center_stats,
    center_update_,
    debiased_center_loss,
    debiased_center_loss_with_stats,
)

# (B, D, C): odd sizes, C = 1, a batch smaller than C (classes absent), D not a multiple of the
# kernels' 128-column segments, and one above the CPU kernels' parallel threshold (2^18 elements).
SHAPES = [(1, 1, 1), (7, 33, 1), (5, 17, 9), (37, 129, 5), (64, 200, 10), (520, 640, 7)]
# dtype -> (rtol, atol relative to the largest reference value) for the loss and its gradient.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.float16: (3e-3, 1e-3),
    torch.bfloat16: (2e-2, 4e-3),
}


def _inputs(B: int, D: int, C: int, gen: torch.Generator, dtype=torch.float32, absent: bool = False):
    """Random features/labels/centers/weights; with ``absent`` the batch skips every other class."""
    f = (torch.randn(B, D, generator=gen) * 1.5 + 0.3).to(dtype)
    classes = torch.arange(0, C, 2) if absent and C > 1 else torch.arange(C)
    y = classes[torch.randint(0, classes.numel(), (B,), generator=gen)]
    c = torch.randn(C, D, generator=gen, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    w = torch.rand(C, generator=gen) * 2 + 0.1
    return f, y, c, w


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * scale + 1e-300)


def _ref64(f, y, c, w):
    """float64 reference loss and gradient on the same (already rounded) inputs."""
    f64 = f.detach().double().requires_grad_()
    loss = ref.debiased_center_loss(f64, y, c.double(), w.double())
    (g,) = torch.autograd.grad(loss, f64)
    return loss.detach(), g


def _expected_update(f, y, c, alpha):
    """Wen et al. rule written out per class (an independent loop, float64)."""
    out = c.double().clone()
    for j in range(c.shape[0]):
        rows = f.double()[y == j]
        if rows.shape[0]:
            out[j] -= alpha * (c.double()[j] - rows).sum(0) / (1 + rows.shape[0])
    return out


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,D,C", SHAPES)
@pytest.mark.parametrize("absent", [False, True])
def test_loss_and_grad_match_reference(seed, dtype, B, D, C, absent):
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = _inputs(B, D, C, gen, dtype, absent)
    f.requires_grad_()
    loss = debiased_center_loss(f, y, c, w)
    loss.backward()
    want_loss, want_grad = _ref64(f, y, c, w)
    assert loss.dtype == dtype and loss.shape == ()
    assert f.grad.dtype == dtype and f.grad.shape == (B, D)
    _close(loss, want_loss, dtype)
    _close(f.grad, want_grad, dtype)


@pytest.mark.parametrize("B,D,C", SHAPES)
def test_grad_scales_with_upstream_gradient(seed, B, D, C):
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = _inputs(B, D, C, gen)
    f.requires_grad_()
    k = float(torch.rand((), generator=gen)) * 3 - 1.5
    (k * debiased_center_loss(f, y, c, w)).backward()
    _, want = _ref64(f, y, c, w)
    _close(f.grad, k * want, torch.float32)


@pytest.mark.parametrize("B,D,C", SHAPES)
@pytest.mark.parametrize("absent", [False, True])
def test_stats_update_and_apply_match_reference(seed, B, D, C, absent):
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = _inputs(B, D, C, gen, torch.float32, absent)
    alpha = float(torch.rand((), generator=gen))
    want = _expected_update(f, y, c, alpha)

    stats = center_stats(f, y, c)
    torch.testing.assert_close(stats.counts, torch.bincount(y, minlength=C))
    want_sums = torch.zeros(C, D, dtype=torch.float64).index_add_(0, y, f.double() - c.double()[y])
    torch.testing.assert_close(stats.delta_sums.double(), want_sums, rtol=1e-5, atol=1e-5)

    got_update = center_update_(f, y, c.clone(), alpha)
    got_ref = ref.center_update_(f, y, c.clone(), alpha)
    got_apply = center_apply_(c.clone(), stats.delta_sums, stats.counts, alpha)
    for got in (got_update, got_ref, got_apply):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # Classes absent from the batch keep their centers bit for bit.
    missing = torch.bincount(y, minlength=C) == 0
    assert torch.equal(got_update[missing], c[missing])
    assert torch.equal(got_apply[missing], c[missing])

    # The fused forward's statistics are the same numbers as center_stats'.
    loss_s, fwd_stats = debiased_center_loss_with_stats(f, y, c, w)
    assert torch.equal(fwd_stats.delta_sums, stats.delta_sums)
    assert torch.equal(fwd_stats.counts, stats.counts)
    assert torch.equal(loss_s, debiased_center_loss(f, y, c, w))


@pytest.mark.parametrize("fdtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cdtype", [torch.float32, torch.float64])
def test_update_dtypes(seed, fdtype, cdtype):
    gen = torch.Generator().manual_seed(seed)
    f, y, c, _ = _inputs(41, 75, 6, gen, fdtype)
    c = c.to(cdtype)
    got = center_update_(f, y, c.clone(), 0.5)
    assert got.dtype == cdtype
    tol = 1e-12 if cdtype == torch.float64 else 1e-5  # the result is rounded to the centers dtype
    torch.testing.assert_close(got.double(), _expected_update(f, y, c, 0.5), rtol=tol, atol=tol)


# Many classes (issue 18): C = 1000 with most classes absent, C > B, odd sizes, more rows than a
# CUDA segment tile (1024); the update walks class segments, not all labels per class.
LARGE_C_SHAPES = [(257, 67, 1000), (1030, 19, 997), (64, 33, 65)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B,D,C", LARGE_C_SHAPES)
def test_large_class_counts_match_reference(seed, dtype, B, D, C):
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = _inputs(B, D, C, gen, dtype)
    y[: B // 3] = y[0]  # one crowded class next to many single-sample and absent ones
    f.requires_grad_()
    k = float(torch.rand((), generator=gen)) + 0.5
    loss, stats = debiased_center_loss_with_stats(f, y, c, w)
    (k * loss).backward()
    want_loss, want_grad = _ref64(f, y, c, w)
    _close(loss, want_loss, dtype)
    # a bf16 loss's upstream gradient is bf16: the op reads that value as it is
    k_seen = torch.tensor(k, dtype=dtype).double().item()
    _close(f.grad, k_seen * want_grad, dtype)
    assert torch.equal(stats.counts, torch.bincount(y, minlength=C))
    want_sums = torch.zeros(C, D, dtype=torch.float64).index_add_(0, y, f.detach().double() - c.double()[y])
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(stats.delta_sums.double(), want_sums, rtol=tol, atol=tol)
    want = _expected_update(f.detach(), y, c, 0.5)
    got = center_update_(f.detach(), y, c.clone(), 0.5)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    absent = torch.bincount(y, minlength=C) == 0
    assert absent.any() and torch.equal(got[absent], c[absent])


def test_scratch_reuse_across_shapes(seed):
    # The CPU kernels keep their scratch between calls (no per-call allocation): a call after a larger
    # or a differently shaped one must not see its leftovers (stale class starts, counts, row sums).
    gen = torch.Generator().manual_seed(seed)
    for B, D, C in [(300, 40, 900), (9, 5, 3), (520, 640, 7), (4, 3, 1000), (33, 17, 2)]:
        f, y, c, w = _inputs(B, D, C, gen)
        want_loss, _ = _ref64(f, y, c, w)
        _close(debiased_center_loss(f, y, c, w), want_loss, torch.float32)
        loss, stats = debiased_center_loss_with_stats(f, y, c, w)
        _close(loss, want_loss, torch.float32)
        assert torch.equal(stats.counts, torch.bincount(y, minlength=C))
        got = center_update_(f, y, c.clone(), 0.5)
        torch.testing.assert_close(got.double(), _expected_update(f, y, c, 0.5), rtol=1e-5, atol=1e-5)


def test_check_finite_default_per_device():
    from amgsn.ops.center_loss import resolve_check_finite

    # CPU: checked (no sync to save); CUDA: deferred to the loss value, which the training loop's
    # NonFiniteGuard reads at its one sync per step.
    assert resolve_check_finite(None, torch.device("cpu")) is True
    assert resolve_check_finite(None, torch.device("cuda", 0)) is False
    assert resolve_check_finite(True, torch.device("cuda", 0)) is True
    assert resolve_check_finite(False, torch.device("cpu")) is False
    with pytest.raises(TypeError, match="check_finite"):
        resolve_check_finite(1, torch.device("cpu"))
    with pytest.raises(TypeError, match="check_finite"):
        DebiasedCenterLoss(3, 4, check_finite="yes")
    # Unchecked, a non-finite feature or center always shows in the loss (rows only add up >= 0).
    f, y, c, w = _base()
    for value in (math.nan, math.inf, -math.inf):
        bad = f.clone()
        bad[5, 0] = value
        assert not math.isfinite(debiased_center_loss(bad, y, c, w, check_finite=False).item())
        bad_c = c.clone()
        bad_c[y[0], 1] = value
        assert not math.isfinite(debiased_center_loss(f, y, bad_c, w, check_finite=False).item())


def test_zero_weight_and_empty_batches(seed):
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = _inputs(12, 10, 4, gen)
    # Every sample in a zero-weight class: no loss, no gradient (not 0/0).
    w = torch.ones(4)
    w[y.unique()] = 0.0
    f.requires_grad_()
    loss = debiased_center_loss(f, y, c, w)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(f.grad) == 0
    # Only the weighted samples count.
    w2 = torch.rand(4, generator=gen) + 0.5
    w2[y[0]] = 0.0
    keep = y != y[0]
    _close(debiased_center_loss(f, y, c, w2), _ref64(f[keep], y[keep], c, w2)[0], torch.float32)
    # Empty batch.
    e = torch.zeros(0, 10, requires_grad=True)
    ey = torch.zeros(0, dtype=torch.long)
    loss = debiased_center_loss(e, ey, c, w2)
    loss.backward()
    assert loss.item() == 0.0 and e.grad.shape == (0, 10)
    assert torch.equal(center_update_(e.detach(), ey, c.clone(), 0.5), c)
    stats = center_stats(e, ey, c)
    assert torch.count_nonzero(stats.delta_sums) == 0 and torch.count_nonzero(stats.counts) == 0


def test_non_contiguous_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = _inputs(30, 64, 5, gen)
    ft = f.t().contiguous().t().requires_grad_()  # same values, column-major
    ct = c.t().contiguous().t()
    loss = debiased_center_loss(ft, y, ct, w)
    loss.backward()
    want_loss, want_grad = _ref64(f, y, c, w)
    _close(loss, want_loss, torch.float32)
    _close(ft.grad, want_grad, torch.float32)
    got = center_update_(f[:, ::2], y, ct[:, ::2], 0.5)  # strided view updated in place
    want = _expected_update(f[:, ::2], y, c[:, ::2], 0.5)
    torch.testing.assert_close(ct[:, ::2].double(), want, rtol=1e-5, atol=1e-5)
    assert got.data_ptr() == ct.data_ptr()
    assert torch.equal(ct[:, 1::2], c[:, 1::2])


def test_results_are_deterministic_across_thread_counts(seed):
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = _inputs(520, 640, 9, gen)  # above the parallel threshold
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            fwd = torch.ops.amgsn.center_loss_forward(f, y, c, w, True, True)
            upd = center_update_(f, y, c.clone(), 0.5)
            outs.append((*fwd, upd))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# torch.library contract
# --------------------------------------------------------------------------------------------


def test_gradcheck_float64(seed):
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = _inputs(9, 7, 4, gen, torch.float64)
    f.requires_grad_()
    fn = lambda x: debiased_center_loss(x, y, c, w)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (f,))
    assert torch.autograd.gradgradcheck(fn, (f,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_double_backward_matches_float64_reference(seed, dtype):
    # gradgradcheck differentiates the op's own double-backward path twice, so it cannot see a wrong
    # factor shared by both; here the gradient (create_graph) and its derivative are compared with
    # the reference's in float64. Non-uniform weights and an upstream gradient != 1 make every
    # factor (w[y_i], 1/Σw, grad_out) visible.
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = _inputs(11, 6, 4, gen, dtype)
    v = torch.randn(f.shape, generator=gen, dtype=torch.float64)
    outer = 1.7

    def grads(loss_fn, x):
        x = x.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(loss_fn(x, y, c, w) * outer, x, create_graph=True)
        (gg,) = torch.autograd.grad((g.double() * v).sum(), x)
        return g.detach().double(), gg.double()

    g, gg = grads(debiased_center_loss, f)
    g_ref, gg_ref = grads(ref.debiased_center_loss, f.double())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gg, gg_ref, rtol=tol, atol=tol)
    # the closed form: dL/df_i = w[y_i] (f_i - c[y_i]) / Σ_j w[y_j]; its derivative along v is linear
    wy = w.double()[y]
    torch.testing.assert_close(g_ref, outer * wy[:, None] * (f.double() - c.double()[y]) / wy.sum())
    torch.testing.assert_close(gg_ref, outer * wy[:, None] * v / wy.sum())


def test_centers_and_weights_get_no_gradient(seed):
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = _inputs(9, 7, 4, gen)
    c = torch.nn.Parameter(c)
    w.requires_grad_()
    f.requires_grad_()
    debiased_center_loss(f, y, c, w).backward()
    assert c.grad is None and w.grad is None and f.grad is not None
    center_update_(f, y, c, 0.5)  # in place on a Parameter: allowed, outside autograd


def test_updating_centers_before_backward_is_an_error(seed):
    # The backward reads the centers of the forward: an in-place update in between must not be
    # silently used (the order of docs/method.md §4.3 is forward, backward, optimiser step, update).
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = _inputs(9, 7, 4, gen)
    f.requires_grad_()
    loss = debiased_center_loss(f, y, c, w)
    center_update_(f, y, c, 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_opcheck(seed):
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = _inputs(13, 19, 5, gen)
    ops = torch.ops.amgsn
    for with_stats in (False, True):
        torch.library.opcheck(ops.center_loss_forward.default, (f.clone().requires_grad_(), y, c, w, with_stats, True))
    fb = f.to(torch.bfloat16).requires_grad_()
    torch.library.opcheck(ops.center_loss_forward.default, (fb, y, c, w, False, False))
    inv_wsum = ops.center_loss_forward(f, y, c, w, False, True)[1]
    torch.library.opcheck(ops.center_loss_backward.default, (torch.tensor(0.7), f, y, c, w, inv_wsum))
    torch.library.opcheck(ops.center_stats.default, (f, y, c))
    stats = center_stats(f, y, c)
    torch.library.opcheck(ops.center_apply.default, (c.clone(), stats.delta_sums, stats.counts, 0.3))
    torch.library.opcheck(ops.center_update.default, (f, y, c.clone(), 0.3))


def test_torch_compile_fullgraph(seed):
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = _inputs(23, 31, 6, gen)

    @torch.compile(fullgraph=True)
    def loss_fn(features, labels, centers, weights):
        return 0.25 * debiased_center_loss(features, labels, centers, weights)

    @torch.compile(fullgraph=True)
    def update_fn(features, labels, centers):
        center_update_(features, labels, centers, 0.5)

    fc = f.clone().requires_grad_()
    cc = c.clone()
    loss = loss_fn(fc, y, cc, w)
    loss.backward()
    update_fn(fc.detach(), y, cc)  # after the backward, as in training
    want_loss, want_grad = _ref64(f, y, c, w)
    _close(loss, 0.25 * want_loss, torch.float32)
    _close(fc.grad, 0.25 * want_grad, torch.float32)
    torch.testing.assert_close(cc.double(), _expected_update(f, y, c, 0.5), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _base():
    gen = torch.Generator().manual_seed(0)
    return _inputs(6, 5, 3, gen)


@pytest.mark.parametrize(
    "change,exc,name",
    [
        (lambda f, y, c, w: (f[0], y, c, w), ValueError, "features"),
        (lambda f, y, c, w: (f.long(), y, c, w), TypeError, "features"),
        (lambda f, y, c, w: ([[1.0]], y, c, w), TypeError, "features"),
        (lambda f, y, c, w: (f, y.int(), c, w), TypeError, "labels"),
        (lambda f, y, c, w: (f, y[:-1], c, w), ValueError, "labels"),
        (lambda f, y, c, w: (f, y, c[:, :-1], w), ValueError, "centers"),
        (lambda f, y, c, w: (f, y, c.half(), w), TypeError, "centers"),
        (lambda f, y, c, w: (f, y, c[:0], w[:0]), ValueError, "centers"),
        (lambda f, y, c, w: (f, y, c, w[:-1]), ValueError, "class_weights"),
        (lambda f, y, c, w: (f, y, c, w.long()), TypeError, "class_weights"),
        (lambda f, y, c, w: (f, y.to("meta"), c, w), ValueError, "labels on meta"),
    ],
)
def test_bad_shapes_and_dtypes(change, exc, name):
    args = change(*_base())
    with pytest.raises(exc, match=name):
        debiased_center_loss(*args)


@pytest.mark.parametrize("bad", [-1, 3, 1 << 40])
def test_labels_out_of_range(bad):
    f, y, c, w = _base()
    y[4] = bad
    for call in (
        lambda: debiased_center_loss(f, y, c, w),
        lambda: debiased_center_loss_with_stats(f, y, c, w),
        lambda: center_stats(f, y, c),
        lambda: center_update_(f, y, c.clone(), 0.5),
        # The op itself checks too (memory safety does not depend on the Python wrapper).
        lambda: torch.ops.amgsn.center_loss_forward(f, y, c, w, False, False),
        lambda: torch.ops.amgsn.center_update(f, y, c.clone(), 0.5),
    ):
        with pytest.raises(ValueError, match=r"labels\[4\] = .* outside \[0, C\)"):
            call()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs(value):
    f, y, c, w = _base()
    bad_f = f.clone()
    bad_f[2, 3] = value
    with pytest.raises(ValueError, match=r"features contains a non-finite value at \[2, 3\]"):
        debiased_center_loss(bad_f, y, c, w)
    loss = debiased_center_loss(bad_f, y, c, w, check_finite=False)  # opt-out: no check, no error
    assert not math.isfinite(loss.item())
    bad_c = c.clone()
    bad_c[y[1], 4] = value
    with pytest.raises(ValueError, match=rf"centers contains a non-finite value at \[{int(y[1])}, 4\]"):
        debiased_center_loss(f, y, bad_c, w)
    bad_w = w.clone()
    bad_w[1] = value
    with pytest.raises(ValueError, match=r"class_weights\[1\]"):
        debiased_center_loss(f, y, c, bad_w)


def test_overflow_of_finite_features_is_not_an_input_error():
    f, y, c, w = _base()
    f = f * 1e30  # ‖f − c‖² overflows float32: the loss is inf, but the input is valid
    assert math.isinf(debiased_center_loss(f, y, c, w).item())


def test_other_bad_arguments():
    f, y, c, w = _base()
    w_neg = w.clone()
    w_neg[0] = -1.0
    with pytest.raises(ValueError, match=r"class_weights\[0\] = -1 must be finite and >= 0"):
        debiased_center_loss(f, y, c, w_neg)
    for alpha in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="alpha"):
            center_update_(f, y, c.clone(), alpha)
    with pytest.raises(TypeError, match="alpha"):
        center_update_(f, y, c.clone(), "0.5")
    stats = center_stats(f, y, c)
    with pytest.raises(ValueError, match="delta_sums"):
        center_apply_(c.clone(), stats.delta_sums[:-1], stats.counts)
    with pytest.raises(ValueError, match="counts"):
        center_apply_(c.clone(), stats.delta_sums, stats.counts[:-1])
    with pytest.raises(TypeError, match="counts"):
        center_apply_(c.clone(), stats.delta_sums, stats.counts.float())
    with pytest.raises(ValueError, match=r"counts\[1\] = -2 must be >= 0"):
        center_apply_(c.clone(), stats.delta_sums, torch.tensor([1, -2, 0]))


# --------------------------------------------------------------------------------------------
# DebiasedCenterLoss
# --------------------------------------------------------------------------------------------


def test_module_forward_update_and_state_dict(seed):
    gen = torch.Generator().manual_seed(seed)
    f, y, _, _ = _inputs(40, 24, 5, gen)
    counts = [30, 7, 1, 12, 50]
    m = DebiasedCenterLoss(5, 24, class_counts=counts, weighting="inverse", alpha=0.3)
    assert torch.count_nonzero(m.centers) == 0  # zero init: identical on every rank
    assert set(m.state_dict()) == {"centers", "class_weights"}
    for _ in range(3):
        before = m.centers.clone()
        fr = f.clone().requires_grad_()
        loss = m(fr, y)
        loss.backward()
        want_loss, want_grad = _ref64(f, y, before, m.class_weights)
        _close(loss, want_loss, torch.float32)
        _close(fr.grad, want_grad, torch.float32)
        m.update_centers(fr, y)
        torch.testing.assert_close(m.centers.double(), _expected_update(f, y, before, 0.3), rtol=1e-5, atol=1e-5)
        f = f + torch.randn(f.shape, generator=gen) * 0.1
    m2 = DebiasedCenterLoss(5, 24)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.centers, m.centers) and torch.equal(m2.class_weights, m.class_weights)
    assert torch.equal(m2(f, y), m(f, y))


def test_class_weight_schemes():
    counts = [10, 0, 5, 40, 1]
    n = torch.tensor(counts, dtype=torch.float64)
    present = n > 0
    with pytest.warns(UserWarning, match=r"classes \[1\] have a training count of 0"):
        inv = class_weights_from_counts(counts, "inverse")
    raw = torch.tensor([1 / 10, 0, 1 / 5, 1 / 40, 1.0], dtype=torch.float64)
    torch.testing.assert_close(inv.double(), raw / raw[present].mean(), rtol=1e-6, atol=0)
    beta = 0.99
    with pytest.warns(UserWarning):
        eff = class_weights_from_counts(counts, "effective", beta)
    raw = torch.tensor([(1 - beta) / (1 - beta**k) if k else 0.0 for k in counts], dtype=torch.float64)
    torch.testing.assert_close(eff.double(), raw / raw[present].mean(), rtol=1e-6, atol=0)
    with pytest.warns(UserWarning):
        none = class_weights_from_counts(counts, "none")
    assert none.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]
    for w in (inv, eff, none):
        assert w.dtype == torch.float32 and w[1] == 0
        assert abs(w[present].double().mean().item() - 1.0) < 1e-6
    # β = 0.9999 with small counts: effective numbers ≈ counts, so ≈ inverse frequency.
    eff_small = class_weights_from_counts([3, 6, 12], "effective", 0.9999)
    torch.testing.assert_close(eff_small, class_weights_from_counts([3, 6, 12], "inverse"), rtol=2e-3, atol=0)
    # Module: counts -> weights, with the warning; the zero-weight class does not count.
    with pytest.warns(UserWarning, match="count of 0"):
        m = DebiasedCenterLoss(5, 3, class_counts=counts, weighting="effective", beta=beta)
    torch.testing.assert_close(m.class_weights, eff)
    assert torch.equal(DebiasedCenterLoss(5, 3).class_weights, torch.ones(5))
    explicit = DebiasedCenterLoss(3, 2, class_weights=[0.5, 2.0, 0.0])
    assert explicit.class_weights.tolist() == [0.5, 2.0, 0.0]


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="weighting"):
        DebiasedCenterLoss(3, 4, class_counts=[1, 2, 3], weighting="sqrt")
    with pytest.raises(ValueError, match="not both"):
        DebiasedCenterLoss(3, 4, class_counts=[1, 2, 3], class_weights=[1, 1, 1])
    with pytest.raises(ValueError, match="class_counts"):
        DebiasedCenterLoss(3, 4, class_counts=[1, 2])
    with pytest.raises(ValueError, match="class_counts"):
        DebiasedCenterLoss(3, 4, class_counts=[1, -2, 3])
    with pytest.raises(ValueError, match="no class with a positive count"):
        DebiasedCenterLoss(2, 4, class_counts=[0, 0])
    with pytest.raises(ValueError, match="class_weights"):
        DebiasedCenterLoss(3, 4, class_weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="num_classes"):
        DebiasedCenterLoss(0, 4)
    with pytest.raises(ValueError, match="feat_dim"):
        DebiasedCenterLoss(3, 2.5)
    with pytest.raises(ValueError, match="alpha"):
        DebiasedCenterLoss(3, 4, alpha=2.0)
    with pytest.raises(ValueError, match="beta"):
        DebiasedCenterLoss(3, 4, class_counts=[1, 2, 3], weighting="effective", beta=1.0)


# --------------------------------------------------------------------------------------------
# CUDA (benchmarks/gpu_check.sh)
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,D,C", SHAPES + [(1000, 768, 1000), (300, 1000, 3)])
@pytest.mark.parametrize("absent", [False, True])
def test_cuda_matches_reference(seed, dtype, B, D, C, absent):
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = _inputs(B, D, C, gen, dtype, absent)
    fc = f.cuda().requires_grad_()
    yc, cc, wc = y.cuda(), c.cuda(), w.cuda()
    loss, stats = debiased_center_loss_with_stats(fc, yc, cc, wc)
    (0.5 * loss).backward()
    want_loss, want_grad = _ref64(f, y, c, w)
    _close(loss.cpu(), want_loss, dtype)
    _close(fc.grad.cpu(), 0.5 * want_grad, dtype)
    cpu_stats = center_stats(f, y, c)
    assert torch.equal(stats.counts.cpu(), cpu_stats.counts)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(stats.delta_sums.cpu(), cpu_stats.delta_sums, rtol=tol, atol=tol)
    assert torch.equal(loss, debiased_center_loss(fc, yc, cc, wc))
    got = center_update_(fc, yc, cc.clone(), 0.5).cpu()
    applied = center_apply_(cc.clone(), stats.delta_sums, stats.counts, 0.5).cpu()
    want = _expected_update(f, y, c, 0.5)
    for g in (got, applied):
        torch.testing.assert_close(g.double(), want, rtol=tol, atol=tol)
    missing = torch.bincount(y, minlength=C) == 0
    assert torch.equal(got[missing], c[missing])


@pytest.mark.cuda
def test_cuda_deterministic_and_bad_values(seed):
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = (t.cuda() for t in _inputs(777, 513, 9, gen))
    a = torch.ops.amgsn.center_loss_forward(f, y, c, w, True, True)
    b = torch.ops.amgsn.center_loss_forward(f, y, c, w, True, True)
    for x, z in zip(a, b):
        assert torch.equal(x, z)
    assert torch.equal(center_update_(f, y, c.clone(), 0.5), center_update_(f, y, c.clone(), 0.5))
    bad = f.clone()
    bad[3, 7] = math.nan
    with pytest.raises(ValueError, match="features contains non-finite"):
        debiased_center_loss(bad, y, c, w, check_finite=True)
    # the CUDA default does not check (no sync): the NaN shows in the loss instead
    assert math.isnan(debiased_center_loss(bad, y, c, w).item())
    w2 = w.clone()
    w2[0] = -1
    with pytest.raises(ValueError, match="class_weights"):
        debiased_center_loss(f, y, c, w2, check_finite=True)
    # the flag word is per call: a clean call after a flagged one passes
    debiased_center_loss(f, y, c, w, check_finite=True)


@pytest.mark.cuda
@pytest.mark.parametrize("B,D,C", [(257, 67, 1000), (1030, 19, 997), (2500, 40, 9000), (33, 300, 33)])
def test_cuda_segmented_classes_match_reference(seed, B, D, C):
    # C > 32 takes the segmented path (counting sort by class); 9000 classes keep the sort's cursors
    # in global memory; B > 1024 spans several placement tiles; a crowded class sits among many absent ones.
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = _inputs(B, D, C, gen, torch.bfloat16)
    y[: B // 3] = y[0]
    fc = f.cuda().requires_grad_()
    yc, cc, wc = y.cuda(), c.cuda(), w.cuda()
    loss, stats = debiased_center_loss_with_stats(fc, yc, cc, wc)
    loss.backward()
    want_loss, want_grad = _ref64(f, y, c, w)
    _close(loss.cpu(), want_loss, torch.bfloat16)
    _close(fc.grad.cpu(), want_grad, torch.bfloat16)
    cpu_stats = center_stats(f, y, c)
    assert torch.equal(stats.counts.cpu(), cpu_stats.counts)
    torch.testing.assert_close(stats.delta_sums.cpu(), cpu_stats.delta_sums, rtol=1e-4, atol=1e-4)
    assert torch.equal(center_stats(fc, yc, cc).delta_sums, stats.delta_sums)
    got = center_update_(fc.detach(), yc, cc.clone(), 0.5).cpu()
    torch.testing.assert_close(got.double(), _expected_update(f, y, c, 0.5), rtol=1e-4, atol=1e-4)
    absent = torch.bincount(y, minlength=C) == 0
    assert absent.any() and torch.equal(got[absent], c[absent])
    # deterministic: the same bits again (the workspace is reused, its counters reset by the kernels)
    assert torch.equal(center_update_(fc.detach(), yc, cc.clone(), 0.5).cpu(), got)
    assert torch.equal(debiased_center_loss_with_stats(fc, yc, cc, wc)[1].delta_sums, stats.delta_sums)


@pytest.mark.cuda
def test_cuda_label_paths_agree_bitwise(seed):
    # The same rows summed in the same (index) order: the few-class kernel (C <= 32) and the segmented
    # one (C > 32, here 40 classes of which the batch uses the first 10) give identical bits.
    gen = torch.Generator().manual_seed(seed)
    f, y, c, _ = (t.cuda() for t in _inputs(700, 131, 10, gen))
    c_big = torch.cat([c, torch.randn(30, 131, generator=gen).cuda()])
    small, big = center_stats(f, y, c), center_stats(f, y, c_big)
    assert torch.equal(small.delta_sums, big.delta_sums[:10]) and torch.equal(small.counts, big.counts[:10])
    assert torch.count_nonzero(big.counts[10:]) == 0 and torch.count_nonzero(big.delta_sums[10:]) == 0
    upd_small = center_update_(f, y, c.clone(), 0.3)
    upd_big = center_update_(f, y, c_big.clone(), 0.3)
    assert torch.equal(upd_small, upd_big[:10]) and torch.equal(upd_big[10:], c_big[10:])


@pytest.mark.cuda
@pytest.mark.parametrize("C", [7, 1000])
def test_cuda_default_step_makes_no_host_sync(seed, C):
    # forward + backward + update of the module, bf16 features, default check_finite: no host sync.
    gen = torch.Generator().manual_seed(seed)
    m = DebiasedCenterLoss(C, 96, class_counts=torch.randint(1, 50, (C,), generator=gen)).cuda()
    f = torch.randn(256, 96, generator=gen).cuda().bfloat16().requires_grad_()
    y = torch.randint(0, C, (256,), generator=gen).cuda()
    m(f, y).backward()  # warm-up (arch probe, workspace)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            f.grad = None
            m(f, y).backward()
            m.update_centers(f, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert f.grad.dtype == torch.bfloat16 and torch.isfinite(f.grad.float()).all()


@pytest.mark.cuda
@pytest.mark.parametrize("call", ["loss", "update"])
def test_cuda_labels_out_of_range_trip_device_assert(call):
    # A device-side assert poisons the CUDA context: run it in a child process.
    code = textwrap.dedent(
        f"""
        import torch
        from amgsn.ops.center_loss import center_update_, debiased_center_loss
        f = torch.randn(8, 16, device="cuda"); c = torch.randn(3, 16, device="cuda")
        y = torch.tensor([0, 1, 2, 0, 1, 2, 3, 0], device="cuda")
        if "{call}" == "loss":
            debiased_center_loss(f, y, c, torch.ones(3, device="cuda"), check_finite=False)
        else:
            center_update_(f, y, c, 0.5)
        torch.cuda.synchronize()
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "assert" in (proc.stderr + proc.stdout).lower()


@pytest.mark.cuda
def test_cuda_opcheck_and_compile(seed):
    gen = torch.Generator().manual_seed(seed)
    f, y, c, w = (t.cuda() for t in _inputs(13, 19, 5, gen))
    torch.library.opcheck(torch.ops.amgsn.center_loss_forward.default,
                          (f.clone().requires_grad_(), y, c, w, True, True))
    torch.library.opcheck(torch.ops.amgsn.center_update.default, (f, y, c.clone(), 0.3))

    @torch.compile(fullgraph=True)
    def step(features, labels, centers, weights):
        return debiased_center_loss(features, labels, centers, weights, check_finite=False)

    fc = f.clone().requires_grad_()
    step(fc, y, c, w).backward()
    want_loss, want_grad = _ref64(f.cpu(), y.cpu(), c.cpu(), w.cpu())
    _close(fc.grad.cpu(), want_grad, torch.float32)
