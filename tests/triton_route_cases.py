"""The public masking ops on CPU tensors through the CUDA route — Triton launchers, planning and checks —
run by test_masking_triton_route.py in a subprocess with AMGSN_TRITON_ON_CPU=1 and TRITON_INTERPRET=1
(not collected by the normal session: the file name does not start with ``test_``)."""

from __future__ import annotations

import pytest
import torch
from masking_cases import (
    HAND_KEEP_TABLE,
    SyncCounter,
    assert_fused_matches_independent_reference,
    assert_same_selection,
    bad_cases,
    make_ratios,
    make_scores,
)

from amgsn import ops
from amgsn.ops import masking
from amgsn.ops import reference as ref

assert masking.TRITON_ON_CPU, "run with AMGSN_TRITON_ON_CPU=1 TRITON_INTERPRET=1 (test_masking_triton_route.py)"

PACKED = "ids_keep / cu_seqlens are not a valid packed selection"


def _selection(B: int, N: int, gen: torch.Generator) -> ref.MaskSelection:
    r = torch.rand(B, generator=gen, dtype=torch.float64)
    r[0] = 0.0
    r[-1] = 1.0
    return ref.abmg_select(torch.rand(B, N, generator=gen), r)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a view with stride 2 (every other element of a twice-as-long buffer)."""
    buf = torch.full((2 * t.numel(),), 12345, dtype=t.dtype)
    buf[::2] = t
    view = buf[::2]
    assert view.stride() == (2,) and torch.equal(view, t)
    return view


def test_route_reaches_the_triton_launchers(monkeypatch):
    from amgsn import kernels

    called = []
    real = kernels.gather_visible
    monkeypatch.setattr(kernels, "gather_visible", lambda *a: called.append(1) or real(*a))
    sel = ops.abmg_select(torch.rand(2, 9), 0.5)
    ops.gather_visible(torch.randn(2, 9, 3), sel.ids_keep, sel.cu_seqlens)
    assert called == [1]


@pytest.mark.parametrize("score_kind", ["random", "ties", "equal"])
@pytest.mark.parametrize("noise_kind", [None, "absolute", "relative"])
def test_select_matches_reference(seed, score_kind, noise_kind):
    gen = torch.Generator().manual_seed(seed)
    B, N = 5, 37
    scores = make_scores(score_kind, B, N, gen)
    for ratio in (make_ratios("per_image", B, gen), make_ratios("float", B, gen), 0.0, 1.0):
        noise = None if noise_kind is None else torch.rand(B, N, generator=gen) * 0.5
        rel = noise_kind == "relative"
        assert_same_selection(ops.abmg_select(scores, ratio, noise, relative_noise=rel),
                              ref.abmg_select(scores, ratio, noise, rel))


@pytest.mark.parametrize("N,ratios,keep", HAND_KEEP_TABLE)
def test_per_image_packing_hand_table(N, ratios, keep):
    B = len(ratios)
    sel = ops.abmg_select(torch.rand(B, N), torch.tensor(ratios, dtype=torch.float64))
    assert (sel.cu_seqlens[1:] - sel.cu_seqlens[:-1]).tolist() == keep and sel.max_seqlen == max(keep)
    assert (~sel.mask).sum(1).tolist() == keep


@pytest.mark.parametrize("noise_kind", [None, "relative"])
def test_fused_matches_reference(seed, noise_kind):
    gen = torch.Generator().manual_seed(seed)
    B, H, N, d, D = 6, 3, 49, 16, 24
    q, k = torch.randn(B, H, d, generator=gen), torch.randn(B, H, N + 1, d, generator=gen)
    x = torch.randn(B, D, N, generator=gen).transpose(1, 2)  # strided rows
    noise = None if noise_kind is None else torch.rand(B, N, generator=gen) * 0.5
    ratio = make_ratios("per_image", B, gen)
    assert assert_fused_matches_independent_reference(q, k, x, ratio, noise, noise_kind == "relative") >= B - 2


def test_gather_scatter_and_gradients_match_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, D = 4, 23, 6
    sel = _selection(B, N, gen)
    x = torch.randn(B, N, D, generator=gen, requires_grad=True)
    out = ops.gather_visible(x, sel.ids_keep, sel.cu_seqlens)
    assert torch.equal(out, ref.gather_visible(x, sel.ids_keep, sel.cu_seqlens))
    g = torch.randn(out.shape, generator=gen)
    (gx,) = torch.autograd.grad(out, x, g)
    assert torch.equal(gx, ref.scatter_visible(g, sel.ids_keep, sel.cu_seqlens, torch.zeros(D), N))
    y = torch.randn(out.shape, generator=gen, requires_grad=True)
    tok = torch.randn(D, generator=gen, requires_grad=True)
    full = ops.scatter_visible(y, sel.ids_keep, sel.cu_seqlens, tok, N)
    assert torch.equal(full, ref.scatter_visible(y, sel.ids_keep, sel.cu_seqlens, tok, N))
    go = torch.randn(B, N, D, generator=gen)
    gy, gtok = torch.autograd.grad(full, (y, tok), go)
    assert torch.equal(gy, ref.gather_visible(go, sel.ids_keep, sel.cu_seqlens))
    torch.testing.assert_close(gtok.double(), go.double()[sel.mask].sum(0), rtol=1e-6, atol=1e-6)


def test_fused_double_backward_matches_reference(seed):
    # The one-launch backward (through the inverse map) is itself differentiable: the gradient of
    # <grad_x, w> with respect to the upstream gradient is w gathered at the kept patches.
    gen = torch.Generator().manual_seed(seed)
    B, H, N, d, D = 3, 2, 11, 4, 5
    q, k = torch.randn(B, H, d, generator=gen), torch.randn(B, H, N + 1, d, generator=gen)
    x = torch.randn(B, N, D, generator=gen, requires_grad=True)
    visible, sel = ops.abmg_mask_and_gather(q, k, x, make_ratios("per_image", B, gen))
    g = torch.randn(visible.shape, generator=gen, requires_grad=True)
    (gx,) = torch.autograd.grad(visible, x, g, create_graph=True)
    assert torch.equal(gx, ref.scatter_visible(g, sel.ids_keep, sel.cu_seqlens, torch.zeros(D), N))
    w = torch.randn(B, N, D, generator=gen)
    (gg,) = torch.autograd.grad((gx * w).sum(), g)
    assert torch.equal(gg, ref.gather_visible(w, sel.ids_keep, sel.cu_seqlens))


def test_strided_ids_and_cu_seqlens(seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, D = 5, 19, 7
    sel = _selection(B, N, gen)
    x = torch.randn(B, N, D, generator=gen)
    y = torch.randn(sel.ids_keep.numel(), D, generator=gen)
    tok = torch.randn(D, generator=gen)
    want_g = ref.gather_visible(x, sel.ids_keep, sel.cu_seqlens)
    want_s = ref.scatter_visible(y, sel.ids_keep, sel.cu_seqlens, tok, N)
    for ids, cu in ((_strided(sel.ids_keep), sel.cu_seqlens), (sel.ids_keep, _strided(sel.cu_seqlens)),
                    (_strided(sel.ids_keep), _strided(sel.cu_seqlens))):
        assert torch.equal(ops.gather_visible(x, ids, cu), want_g)
        assert torch.equal(ops.scatter_visible(y, ids, cu, tok, N), want_s)
        yg = y.clone().requires_grad_()
        (gy,) = torch.autograd.grad(ops.scatter_visible(yg, ids, cu, tok, N), yg, want_s)
        assert torch.equal(gy, ref.gather_visible(want_s, sel.ids_keep, sel.cu_seqlens))


@pytest.mark.parametrize("max_seqlen", [0, 1, 10_000])
def test_wrong_max_seqlen_is_not_trusted(seed, max_seqlen):
    # Too small used to leave gather rows uninitialised and stop the scatter's search early.
    gen = torch.Generator().manual_seed(seed)
    B, N, D = 4, 31, 5
    sel = _selection(B, N, gen)
    x = torch.randn(B, N, D, generator=gen)
    out = ops.gather_visible(x, sel.ids_keep, sel.cu_seqlens, max_seqlen)
    assert torch.equal(out, ref.gather_visible(x, sel.ids_keep, sel.cu_seqlens))
    tok = torch.randn(D, generator=gen)
    full = ops.scatter_visible(out, sel.ids_keep, sel.cu_seqlens, tok, N, max_seqlen)
    assert torch.equal(full, ref.scatter_visible(out, sel.ids_keep, sel.cu_seqlens, tok, N))


def test_scatter_accepts_unsorted_distinct_ids(seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, D = 3, 17, 4
    sel = _selection(B, N, gen)
    cu = sel.cu_seqlens.tolist()
    ids = torch.cat([sel.ids_keep[cu[b]:cu[b + 1]].flip(0) for b in range(B)])
    y, tok = torch.randn(ids.numel(), D, generator=gen), torch.randn(D, generator=gen)
    assert torch.equal(ops.scatter_visible(y, ids, sel.cu_seqlens, tok, N),
                       ref.scatter_visible(y, ids, sel.cu_seqlens, tok, N))


@pytest.mark.parametrize("case", range(len(bad_cases("cpu"))))
def test_bad_input_names_argument(case):
    name, call = bad_cases("cpu")[case]
    with pytest.raises((ValueError, TypeError), match=name):
        call()


@pytest.mark.parametrize("where", ["gather", "scatter", "scatter_backward", "fused_backward"])
@pytest.mark.parametrize("bad", ["too_big", "negative", "repeated", "cu_decreasing", "cu_end"])
def test_out_of_range_ids_and_bad_cu_are_caught_in_the_kernels(seed, where, bad):
    # No host-side check or cache is involved: a selection changed behind autograd's back (.data), or
    # through an alias, is caught by the kernels themselves.
    gen = torch.Generator().manual_seed(seed)
    B, N, D = 3, 13, 4
    x = torch.randn(B, N, D, generator=gen, requires_grad=True)
    q, k = torch.randn(B, 2, 4, generator=gen), torch.randn(B, 2, N + 1, 4, generator=gen)
    visible, sel = ops.abmg_mask_and_gather(q, k, x, 0.5)
    ids, cu = sel.ids_keep, sel.cu_seqlens
    ids0, cu0 = ids.clone(), cu.clone()
    alias = ids.data.view(-1)  # an alias that autograd's version counter does not see
    if bad == "repeated" and where == "gather":
        return  # a gather may read a patch twice: nothing to catch
    if bad == "too_big":
        ids.data[1] = N
    elif bad == "negative":
        alias[-1] = -1
    elif bad == "repeated":
        ids.data[1] = ids[0]
    elif bad == "cu_decreasing":
        cu.data[1] = cu[2] + 1
    else:
        cu.data[-1] -= 1
    y, tok = torch.randn(ids.numel(), D, generator=gen), torch.zeros(D)
    if where == "fused_backward":
        # The fused op's backward scatters through the forward's own inverse map, not through the
        # ids_keep it returned: a later change to those cannot mislead it (nor be read out of bounds).
        g = torch.randn(visible.shape, generator=gen)
        (gx,) = torch.autograd.grad(visible, x, g)
        assert torch.equal(gx, ref.scatter_visible(g, ids0, cu0, torch.zeros(D), N))
        return
    calls = {
        "gather": lambda: ops.gather_visible(x, ids, cu),
        "scatter": lambda: ops.scatter_visible(y, ids, cu, tok, N),
        "scatter_backward": lambda: masking._scatter_backward_op(torch.randn(B, N, D), ids, cu),
    }
    with pytest.raises(ValueError, match=PACKED + ".*ids_keep.*"):
        calls[where]()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_nan_scores_rank_as_minus_inf_like_the_cpp_kernel(seed):
    gen = torch.Generator().manual_seed(seed)
    B, N = 4, 29
    scores = torch.rand(B, N, generator=gen)
    scores[0, ::4] = float("nan")
    scores[2] = float("nan")
    noise = torch.rand(B, N, generator=gen)
    noise[3, 5] = float("nan")
    r = make_ratios("per_image", B, gen)
    for nz, rel in ((None, False), (noise, False), (noise, True)):
        sel = ops.abmg_select(scores, r, nz, relative_noise=rel)
        assert_same_selection(sel, ref.abmg_select(scores, r, nz, rel))
        # the C++ kernel (the CPU op without the route) makes the same selection
        ids, mask = torch.ops.amgsn._abmg_select_cpu(scores, *masking._ratio_plan(r, B, N, scores.device)[:3],
                                                     nz, rel)
        assert torch.equal(ids, sel.ids_keep) and torch.equal(mask, sel.mask)
    q, k = torch.randn(B, 2, 4, generator=gen), torch.randn(B, 2, N + 1, 4, generator=gen)
    q[1, 0, 0] = float("nan")
    x = torch.randn(B, N, 3, generator=gen)
    visible, sel = ops.abmg_mask_and_gather(q, k, x, r)
    assert_same_selection(sel, ref.abmg_select(ops.cls_attention_scores(q, k), r))
    assert torch.equal(visible, ref.gather_visible(x, sel.ids_keep, sel.cu_seqlens))


# Launch budgets (forward, backward) per call on this route — what a CUDA call launches: Triton
# kernels + aten kernels. The ratio plan is one launch (float ratio: the cu_seqlens arange, num_keep a
# stride-0 view of it; CPU-tensor ratio: one copy of the int32 plan). Selection forward: plan + kernel.
# Fused forward: plan + three kernels (per-head scores, rank + inverse map, gather); its backward: one
# kernel through the forward's inverse map. Gather: flag fill, kernel, assert. Scatter: flag fill,
# inverse map, scatter, assert. Their backward: a zero token (gather) or the token-gradient sum
# (scatter), flag fill, inverse map, kernel, assert.
LAUNCH_BUDGET = {"fused": (4, 1), "select": (2, None), "gather": (3, 5), "scatter": (4, 5)}


@pytest.mark.parametrize("ratio_kind", ["float", "cpu_tensor"])
def test_no_host_syncs_and_few_launches(seed, ratio_kind):
    gen = torch.Generator().manual_seed(seed)
    B, H, N, d, D = 4, 2, 13, 4, 6
    q, k = torch.randn(B, H, d, generator=gen), torch.randn(B, H, N + 1, d, generator=gen)
    x = torch.randn(B, N, D, generator=gen, requires_grad=True)
    scores = torch.rand(B, N, generator=gen)
    ratio = 0.6 if ratio_kind == "float" else torch.rand(B, generator=gen) * 0.5 + 0.3
    sel = ops.abmg_select(scores, ratio)
    y = torch.randn(sel.ids_keep.numel(), D, generator=gen, requires_grad=True)
    tok = torch.randn(D, generator=gen, requires_grad=True)
    calls = {
        "fused": (lambda: ops.abmg_mask_and_gather(q, k, x, ratio)[0], (x,)),
        "select": (lambda: ops.abmg_select(scores, ratio, torch.rand(B, N), relative_noise=True), None),
        "gather": (lambda: ops.gather_visible(x, sel.ids_keep, sel.cu_seqlens), (x,)),
        "scatter": (lambda: ops.scatter_visible(y, sel.ids_keep, sel.cu_seqlens, tok, N), (y, tok)),
    }
    for name, (call, inputs) in calls.items():
        fwd_budget, bwd_budget = LAUNCH_BUDGET[name]
        with SyncCounter() as fwd:
            out = call()
        assert fwd.syncs == [], f"{name} forward syncs: {fwd.syncs}"
        assert fwd.triton and fwd.launches <= fwd_budget, (name, fwd.triton, fwd.torch_ops)
        if inputs is None:
            continue
        grad = torch.randn(out.shape, generator=gen)
        with SyncCounter() as bwd:
            torch.autograd.grad(out, inputs, grad)
        assert bwd.syncs == [], f"{name} backward syncs: {bwd.syncs}"
        assert bwd.launches <= bwd_budget, (name, bwd.triton, bwd.torch_ops)


def test_sync_counter_sees_syncs_in_amgsn_code(monkeypatch):
    # The counter must be able to fail: host reads slipped into the ops' code (a function whose module
    # is amgsn's) are counted, the test's own are not.
    real = masking._ratio_plan
    scope = {"__name__": "amgsn.ops.masking", "real": real}
    exec("def syncing(*a):\n    plan = real(*a)\n    bool(plan[1][-1] > 0)\n    plan[0].tolist()\n"
         "    plan[0][plan[0] > 0]\n    return plan\n", scope)
    monkeypatch.setattr(masking, "_ratio_plan", scope["syncing"])
    with SyncCounter() as c:
        ops.abmg_select(torch.rand(2, 5), 0.5)
        torch.rand(3).tolist()
    assert c.syncs == ["__bool__", "tolist", "boolean index"]
