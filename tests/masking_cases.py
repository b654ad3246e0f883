"""Helpers shared by the masking-op tests (test_masking_ops.py, test_masking_triton_route.py,
test_triton_kernels.py): independent expectations that do not reuse the ops' own formulas."""

from __future__ import annotations

import torch

from amgsn import ops
from amgsn.ops import reference as ref

# Per-image mask ratio -> kept patches, worked out by hand: (1 - r) * N in float64, floored after
# adding 1e-4 (which rescues products like 0.19999999999999996 * 10 from falling to the integer below),
# clamped to [1, N]. Fractional parts >= 0.5 are floored, not rounded. One batch per N.
HAND_KEEP_TABLE: list[tuple[int, list[float], list[int]]] = [
    # (1-r)*N:      1.9999999999999996, 8.5, 4.5, 10, 0 -> clamp, 0.9999999999999998
    (10, [0.8, 0.15, 0.55, 0.0, 1.0, 0.9], [2, 8, 4, 10, 1, 1]),
    # 1.9999999999999996, 6.000000000000001, 19.0
    (20, [0.9, 0.7, 0.05], [2, 6, 19]),
    # 25.5, 35.699999999999996, 15.300000000000002
    (51, [0.5, 0.3, 0.7], [25, 35, 15]),
    # 4.8999999999999995, 0 -> clamp, 7, 4.55
    (7, [0.3, 1.0, 0.0, 0.35], [4, 1, 7, 4]),
]


def boundary_gap(values: torch.Tensor, num_keep: torch.Tensor) -> torch.Tensor:
    """Per image, the gap between the last masked and the first kept value in selection order (inf
    when nothing or everything is masked): only where it is tiny may rounding swap the two."""
    B, N = values.shape
    ordered = values.double().sort(dim=1, descending=True).values.cpu()
    masked = (N - num_keep).cpu()
    last = (masked - 1).clamp(0, N - 1)  # last masked position in order
    first = masked.clamp(0, N - 1)  # first kept position in order
    rows = torch.arange(B)
    gap = ordered[rows, last] - ordered[rows, first]
    gap[(masked == 0) | (masked == N)] = float("inf")
    return gap


def make_ratios(kind: str, B: int, gen: torch.Generator):
    if kind == "float":
        return float(torch.rand((), generator=gen)) * 0.9
    if kind == "zero":
        return 0.0
    if kind == "one":
        return 1.0
    r = torch.rand(B, generator=gen)
    r[0] = 0.0  # both edges in one batch
    if B > 1:
        r[-1] = 1.0
    return r


def make_scores(kind: str, B: int, N: int, gen: torch.Generator) -> torch.Tensor:
    s = torch.rand(B, N, generator=gen)
    if kind == "ties":
        s = torch.round(s * 2) / 2  # three distinct values
    elif kind == "equal":
        s = torch.zeros(B, N)
        s[:, ::2] = -0.0  # +0.0 and -0.0 must tie
    return s


def assert_same_selection(got: ref.MaskSelection, want: ref.MaskSelection) -> None:
    assert got.ids_keep.dtype == torch.int64 and got.cu_seqlens.dtype == torch.int32
    assert got.mask.dtype == torch.bool
    assert torch.equal(got.cu_seqlens, want.cu_seqlens)
    assert torch.equal(got.ids_keep, want.ids_keep)
    assert torch.equal(got.mask, want.mask)
    assert got.max_seqlen == want.max_seqlen


# fp32 scores of the ops vs the reference's (different summation order): measured <= 5e-8 absolute,
# <= 1e-6 relative, over the shapes below.
SCORE_ATOL, SCORE_RTOL = 1e-7, 2e-6


def assert_fused_matches_independent_reference(q, k, x, ratio, noise, rel) -> int:
    """The op against the reference composition (its own scores, argsort, gather): every image must
    agree exactly — mask, ids and visible rows — unless its boundary pair is a genuine near-tie: a gap
    in the reference's selection values within what the score tolerance allows (relative noise of at
    most 0.5 times the range at most doubles a score error). Returns the number of exact images."""
    visible, sel = ops.abmg_mask_and_gather(q, k, x, ratio, noise, relative_noise=rel)
    ref_visible, ref_sel = ref.abmg_mask_and_gather(q, k, x, ratio, noise, rel)
    assert torch.equal(sel.cu_seqlens, ref_sel.cu_seqlens) and sel.max_seqlen == ref_sel.max_seqlen
    ref_scores = ref.cls_attention_scores(q, k)
    torch.testing.assert_close(ops.cls_attention_scores(q, k), ref_scores, atol=SCORE_ATOL, rtol=SCORE_RTOL)
    tie_tol = 4 * (SCORE_ATOL + SCORE_RTOL * ref_scores.abs().max().item())
    num_keep = (ref_sel.cu_seqlens[1:] - ref_sel.cu_seqlens[:-1]).long()
    exact = boundary_gap(ref.selection_values(ref_scores, noise, rel), num_keep) > tie_tol
    cu = sel.cu_seqlens.tolist()
    for b in range(q.shape[0]):
        if exact[b]:
            assert torch.equal(sel.mask[b], ref_sel.mask[b]), f"image {b}: masks differ away from a near-tie"
            assert torch.equal(sel.ids_keep[cu[b]:cu[b + 1]], ref_sel.ids_keep[cu[b]:cu[b + 1]])
            assert torch.equal(visible[cu[b]:cu[b + 1]], ref_visible[cu[b]:cu[b + 1]])
        else:  # still a valid selection of the right size
            assert int((~sel.mask[b]).sum()) == int(num_keep[b])
    assert torch.equal(visible, ref.gather_visible(x, sel.ids_keep, sel.cu_seqlens))
    return int(exact.sum())


def bad_cases(device: str):
    B, N, D = 2, 9, 4
    kw = {"device": device}
    s = torch.rand(B, N, **kw)
    sel = ref.abmg_select(s, 0.5)
    x = torch.randn(B, N, D, **kw)
    y = torch.randn(int(sel.cu_seqlens[-1]), D, **kw)
    tok = torch.zeros(D, **kw)
    q, k = torch.randn(B, 2, 4, **kw), torch.randn(B, 2, N + 1, 4, **kw)
    ids, cu = sel.ids_keep, sel.cu_seqlens
    bad_ids = ids.clone()
    bad_ids[0] = N
    neg_ids = ids.clone()
    neg_ids[-1] = -1
    dup_ids = ids.clone()
    dup_ids[1] = dup_ids[0]
    bad_cu = cu.clone()
    bad_cu[-1] += 1
    return [
        ("mask_ratio", lambda: ops.abmg_select(s, 1.5)),
        ("mask_ratio", lambda: ops.abmg_select(s, -0.1)),
        ("mask_ratio", lambda: ops.abmg_select(s, float("nan"))),
        ("mask_ratio", lambda: ops.abmg_select(s, torch.tensor([0.5, float("nan")], **kw))),
        ("mask_ratio", lambda: ops.abmg_select(s, torch.tensor([0.5, 1.01], **kw))),
        ("mask_ratio", lambda: ops.abmg_select(s, torch.tensor([0.5, 0.5, 0.5], **kw))),
        ("scores", lambda: ops.abmg_select(s[0], 0.5)),
        ("scores", lambda: ops.abmg_select(s.long(), 0.5)),
        ("noise", lambda: ops.abmg_select(s, 0.5, torch.rand(B, N + 1, **kw))),
        ("x", lambda: ops.gather_visible(x.long(), ids, cu)),
        ("x", lambda: ops.gather_visible(x[0], ids, cu)),
        ("ids_keep", lambda: ops.gather_visible(x, ids.int(), cu)),
        ("ids_keep", lambda: ops.gather_visible(x, bad_ids, cu)),
        ("ids_keep", lambda: ops.gather_visible(x, neg_ids, cu)),
        ("cu_seqlens", lambda: ops.gather_visible(x, ids, cu.long())),
        ("cu_seqlens", lambda: ops.gather_visible(x, ids, bad_cu)),
        ("cu_seqlens", lambda: ops.gather_visible(x, ids, cu[:-1])),
        ("cu_seqlens", lambda: ops.gather_visible(x[:1], ids, cu)),
        ("mask_token", lambda: ops.scatter_visible(y, ids, cu, torch.zeros(D + 1, **kw), N)),
        ("ids_keep", lambda: ops.scatter_visible(y, dup_ids, cu, tok, N)),
        ("ids_keep", lambda: ops.scatter_visible(y[:-1], ids, cu, tok, N)),
        ("y", lambda: ops.scatter_visible(y.int(), ids, cu, tok, N)),
        ("N", lambda: ops.scatter_visible(y, ids, cu, tok, 0)),
        ("ids_keep", lambda: ops.scatter_visible(y, ids, cu, tok, 5)),
        ("k", lambda: ops.cls_attention_scores(q, k[:, :1])),
        ("k", lambda: ops.cls_attention_scores(q, k[..., :3])),
        ("q_cls", lambda: ops.cls_attention_scores(q[0], k)),
        ("x", lambda: ops.abmg_mask_and_gather(q, k, x[:, :-1], 0.5)),
        ("mask_ratio", lambda: ops.abmg_mask_and_gather(q, k, x, 2.0)),
    ]


# ---------------------------------------------------------------------------------------------
# Host syncs and launches on the Triton route (issue 18 item 3)
# ---------------------------------------------------------------------------------------------

# Tensor methods that read a device value on the host (a sync on CUDA) when amgsn code calls them.
_SYNC_METHODS = ("item", "tolist", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__")
# aten ops that launch a kernel on CUDA (allocation and views do not); nested ones count once.
_KERNEL_OPS = {
    "aten::fill_", "aten::copy_", "aten::zero_", "aten::cumsum", "aten::sum", "aten::eq", "aten::ne",
    "aten::add", "aten::sub", "aten::mul", "aten::div", "aten::arange", "aten::index", "aten::index_put_",
    "aten::cat", "aten::stack", "aten::any", "aten::max", "aten::min", "aten::clamp", "aten::where",
    "aten::searchsorted", "aten::bitwise_and", "aten::logical_not", "aten::_assert_async", "aten::nonzero",
    "aten::masked_select", "aten::repeat_interleave", "aten::scatter_", "aten::gather", "aten::sort",
}


class SyncCounter:
    """Counts, while active, (a) host syncs made by amgsn code: the Tensor methods above, ``.to()`` to
    the CPU, and indexing with a boolean tensor (all filtered to calls whose caller is an ``amgsn``
    module, so the test's own code and the Triton interpreter's host copies do not count); (b) launches:
    Triton kernel runs and aten kernel ops outside them (from ``torch.profiler``)."""

    def __init__(self) -> None:
        self.syncs: list[str] = []
        self.triton: list[str] = []
        self.torch_ops: list[str] = []

    def __enter__(self) -> SyncCounter:
        import sys

        from torch.profiler import ProfilerActivity, profile, record_function
        from triton.runtime.interpreter import InterpretedFunction

        self._saved: list[tuple[object, str, object]] = []

        def patch(owner: object, name: str, wrapper) -> None:
            self._saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, wrapper)

        def ours() -> bool:
            return sys._getframe(2).f_globals.get("__name__", "").startswith("amgsn")

        for name in _SYNC_METHODS:
            real = getattr(torch.Tensor, name)

            def method(t, *a, _real=real, _name=name, **kw):
                if ours():
                    self.syncs.append(_name)
                return _real(t, *a, **kw)

            patch(torch.Tensor, name, method)
        real_to, real_getitem = torch.Tensor.to, torch.Tensor.__getitem__

        def to(t, *a, **kw):
            target = [v for v in (*a, kw.get("device")) if isinstance(v, (str, torch.device))]
            if ours() and any(torch.device(v).type == "cpu" for v in target):
                self.syncs.append("to(cpu)")
            return real_to(t, *a, **kw)

        def getitem(t, idx):
            parts = idx if isinstance(idx, tuple) else (idx,)
            if ours() and any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self.syncs.append("boolean index")
            return real_getitem(t, idx)

        patch(torch.Tensor, "to", to)
        patch(torch.Tensor, "__getitem__", getitem)
        patch(torch, "nonzero", lambda *a, _real=torch.nonzero, **kw: (self.syncs.append("torch.nonzero")
                                                                       if ours() else None) or _real(*a, **kw))
        real_run = InterpretedFunction.run

        def run(fn, *a, **kw):
            self.triton.append(fn.__name__)
            with record_function("triton_interpreter"):
                return real_run(fn, *a, **kw)

        patch(InterpretedFunction, "run", run)
        self._prof = profile(activities=[ProfilerActivity.CPU])
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        for e in self._prof.events():
            if e.name not in _KERNEL_OPS:
                continue
            parent, nested = e.cpu_parent, False
            while parent is not None:
                nested |= parent.name in _KERNEL_OPS or parent.name == "triton_interpreter"
                parent = parent.cpu_parent
            if not nested:
                self.torch_ops.append(e.name)

    @property
    def launches(self) -> int:
        return len(self.triton) + len(self.torch_ops)
