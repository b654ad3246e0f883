"""The Triton launchers of ``amgsn.kernels`` against ``amgsn.ops.reference`` (docs/method.md §3.1–3.5).

Here they run under the Triton interpreter (conftest sets TRITON_INTERPRET=1) on CPU float32 tensors
(copies also in bf16/fp16, which the interpreter moves as raw bits); the ``cuda``-marked tests repeat
the comparisons on a GPU in bf16/fp16/fp32 and at the benchmark shape. Shapes stay small: the
interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch
from interpreter_memcheck import memcheck, padded
from masking_cases import boundary_gap

from amgsn import kernels as K
from amgsn.ops import reference as R

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _ratios(kind: str, B: int, gen: torch.Generator) -> float | torch.Tensor:
    """Mask ratios: one float for the batch, random per image, or the extremes (keep N / keep 1)."""
    if kind == "scalar":
        return float(torch.rand((), generator=gen, dtype=torch.float64))
    if kind == "per_image":
        return torch.rand(B, generator=gen, dtype=torch.float64)
    if kind == "extremes":  # r = 0 keeps every patch, r = 1 keeps exactly one
        return torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5][:B], dtype=torch.float64)
    raise AssertionError(kind)


def _packing(ratio: float | torch.Tensor, B: int, N: int, device: str = "cpu"):
    """num_keep (B,) int64, cu_seqlens (B+1,) int32, T, max_seqlen — as the ops layer computes them."""
    num_keep = R.num_keep_from_ratio(ratio, B, N).to(device)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(num_keep, 0)
    return num_keep, cu, int(num_keep.sum()), int(num_keep.max())


def _noncontig_rows(B: int, N: int, D: int, dtype=torch.float32, device: str = "cpu") -> torch.Tensor:
    """A (B, N, D) view with no unit stride anywhere but D: transposed, then every other column."""
    base = torch.randn(N, B, 2 * D, device=device).to(dtype)
    view = base.transpose(0, 1)[:, :, ::2]
    assert not view.is_contiguous()
    return view


def _qk(B: int, H: int, N: int, d: int, dtype=torch.float32, device: str = "cpu", scale: float = 1.0):
    """q_cls (B, H, d) and k (B, H, 1+N, d) as attention blocks hold them: views of (B, 1+N, H, d)."""
    qkv = torch.randn(B, 1 + N, 3, H, d, device=device) * scale
    qkv = qkv.to(dtype)
    q_cls = qkv[:, 0, 0]  # (B, H, d), strided
    k = qkv[:, :, 1].transpose(1, 2)  # (B, H, 1+N, d), strided
    return q_cls, k


def _assert_inverse(inv, ids, cu, mask):
    """inv[b, n] = the packed row of patch n of image b (written from an independent loop), -1 where masked."""
    B, N = mask.shape
    want = torch.full((B, N), -1, dtype=torch.int32)
    bounds = cu.cpu().tolist()
    for b in range(B):
        for t in range(bounds[b], bounds[b + 1]):
            want[b, int(ids[t])] = t
    assert inv.dtype == torch.int32 and torch.equal(inv.cpu(), want)
    assert torch.equal(inv.cpu() < 0, mask.cpu())


def _assert_selection(ids, mask, scores, ratio, noise, relative):
    ref = R.abmg_select(scores, ratio, noise, relative)
    assert mask.dtype == torch.bool and ids.dtype == torch.int64
    assert torch.equal(mask, ref.mask)
    assert torch.equal(ids, ref.ids_keep)


# --------------------------------------------------------------------------------------------
# §3.1 scores
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,H,N,d", [(1, 1, 7, 4), (3, 3, 49, 16), (5, 1, 7, 16), (2, 3, 196, 4)])
def test_scores_match_reference(seed, B, H, N, d):
    q_cls, k = _qk(B, H, N, d)
    out = K.cls_attention_scores(q_cls, k)
    assert out.shape == (B, N) and out.dtype == torch.float32
    torch.testing.assert_close(out, R.cls_attention_scores(q_cls, k), rtol=1e-5, atol=1e-5)
    # Also the anchors' full-matrix form (DINO/AttMask CLS row), computed from the same q/k.
    q_full = torch.cat([q_cls[:, :, None], torch.randn(B, H, N, d)], dim=2)
    torch.testing.assert_close(out, R.cls_attention_scores_full(q_full, k), rtol=1e-5, atol=1e-5)


def test_scores_large_logits_are_stable(seed):
    # Logits of order 1e3: exp without the max subtraction would overflow to inf.
    q_cls, k = _qk(3, 3, 49, 16, scale=12.0)
    out = K.cls_attention_scores(q_cls, k)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, R.cls_attention_scores(q_cls, k), rtol=1e-5, atol=1e-5)


def test_scores_contiguous_equals_strided(seed):
    q_cls, k = _qk(3, 3, 49, 16)
    assert torch.equal(
        K.cls_attention_scores(q_cls, k), K.cls_attention_scores(q_cls.contiguous(), k.contiguous())
    )


# --------------------------------------------------------------------------------------------
# §3.2 selection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [7, 49])
@pytest.mark.parametrize("ratio_kind", ["scalar", "per_image", "extremes"])
@pytest.mark.parametrize("noise_mode", ["none", "absolute", "relative"])
def test_select_matches_reference(seed, N, ratio_kind, noise_mode):
    gen = torch.Generator().manual_seed(seed)
    B = 5
    scores = torch.rand(B, N, generator=gen)
    noise = None if noise_mode == "none" else 0.1 * torch.randn(B, N, generator=gen)
    ratio = _ratios(ratio_kind, B, gen)
    num_keep, cu, T, _ = _packing(ratio, B, N)
    ids, mask = K.abmg_select(scores, num_keep, cu, T, noise, noise_mode == "relative")
    _assert_selection(ids, mask, scores, ratio, noise, noise_mode == "relative")
    assert (mask.sum(1) == N - num_keep).all()


def test_select_large_n(seed):
    # N = 784 (e.g. 224 px / 8 px patches): NP = 1024, the 8-warp configuration.
    B, N = 2, 784
    scores = torch.rand(B, N)
    noise = torch.randn(B, N)
    ratio = torch.tensor([0.25, 0.75], dtype=torch.float64)
    num_keep, cu, T, _ = _packing(ratio, B, N)
    ids, mask = K.abmg_select(scores, num_keep, cu, T, noise, True)
    _assert_selection(ids, mask, scores, ratio, noise, True)


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("noise_mode", ["none", "tied_absolute", "tied_relative"])
def test_select_heavy_ties(seed, levels, noise_mode):
    # Scores take only `levels` distinct values (1 = all equal); tied noise keeps values tied, so the
    # index order decides most of the selection.
    gen = torch.Generator().manual_seed(seed)
    B, N = 5, 49
    scores = torch.randint(0, levels, (B, N), generator=gen).float() / 4
    noise = None
    if noise_mode != "none":
        noise = torch.randint(0, 2, (B, N), generator=gen).float() * 0.25
    ratio = _ratios("per_image", B, gen)
    num_keep, cu, T, _ = _packing(ratio, B, N)
    relative = noise_mode == "tied_relative"
    ids, mask = K.abmg_select(scores, num_keep, cu, T, noise, relative)
    _assert_selection(ids, mask, scores, ratio, noise, relative)


def test_select_all_equal_masks_lowest_indices(seed):
    # Independent of the reference: with every value tied, the tie rule masks indices 0..N-keep-1.
    B, N = 3, 49
    scores = torch.full((B, N), 0.3)
    ratio = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    num_keep, cu, T, _ = _packing(ratio, B, N)
    for noise in (None, torch.zeros(B, N)):
        ids, mask = K.abmg_select(scores, num_keep, cu, T, noise, True)
        expect = torch.arange(N)[None, :] < (N - num_keep)[:, None]
        assert torch.equal(mask, expect)
        assert torch.equal(ids, torch.cat([torch.arange(N - int(k), N) for k in num_keep]))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("noise_mode", ["none", "absolute", "relative"])
def test_select_nan_ranks_as_minus_inf(seed, noise_mode):
    # The NaN rule (docs/method.md): a NaN value ranks as -inf, the relative range ignores NaN scores.
    # Checked against the reference and, independently, against the scores with NaN replaced by -inf
    # by hand (no noise: the order is then that of the finite scores, NaNs last by index).
    gen = torch.Generator().manual_seed(seed)
    B, N = 4, 37
    scores = torch.rand(B, N, generator=gen)
    noise = None if noise_mode == "none" else torch.rand(B, N, generator=gen)
    scores[1, ::3] = float("nan")
    scores[2] = float("nan")  # a whole image of NaN: index order decides
    if noise is not None:
        noise[3, ::5] = float("nan")
    ratio = torch.rand(B, generator=gen, dtype=torch.float64)
    num_keep, cu, T, _ = _packing(ratio, B, N)
    ids, mask = K.abmg_select(scores, num_keep, cu, T, noise, noise_mode == "relative")
    _assert_selection(ids, mask, scores, ratio, noise, noise_mode == "relative")
    assert torch.equal(mask[2], torch.arange(N) < N - int(num_keep[2]))
    if noise is None:
        want = R.abmg_select(torch.nan_to_num(scores, nan=float("-inf")), ratio)
        assert torch.equal(ids, want.ids_keep) and torch.equal(mask, want.mask)
    # The same NaN reached through the fused op's scores (q_cls of that image is NaN).
    q_cls, k = _qk(B, 2, N, 8)
    q_cls = q_cls.clone()
    q_cls[1, 0, 0] = float("nan")
    x = torch.randn(B, N, 5)
    visible, ids, mask, inv = K.abmg_mask_and_gather(q_cls, k, x, num_keep, cu, T, noise, noise_mode == "relative")
    _assert_selection(ids, mask, K.cls_attention_scores(q_cls, k), ratio, noise, noise_mode == "relative")
    assert torch.equal(visible, R.gather_visible(x, ids, cu))


def test_select_signed_zeros_tie(seed):
    # -0.0 and +0.0 are equal values: order among them is by index, whatever their sign bits.
    gen = torch.Generator().manual_seed(seed)
    B, N = 5, 49
    choice = torch.randint(0, 3, (B, N), generator=gen)
    scores = torch.where(choice == 0, -0.0, torch.where(choice == 1, 0.0, 0.5))
    noise = torch.where(torch.rand(B, N, generator=gen) < 0.5, -0.0, 0.0)
    ratio = _ratios("per_image", B, gen)
    num_keep, cu, T, _ = _packing(ratio, B, N)
    for nz in (None, noise):
        ids, mask = K.abmg_select(scores, num_keep, cu, T, nz, False)
        _assert_selection(ids, mask, scores, ratio, nz, False)
        # Sign flips of the zeros change nothing.
        ids2, mask2 = K.abmg_select(scores.abs(), num_keep, cu, T, None if nz is None else nz.abs(), False)
        assert torch.equal(mask, mask2) and torch.equal(ids, ids2)


def test_select_relative_noise_uses_float32_range(seed):
    # Scores near 1e4 with tiny spreads: the range must be rounded to float32 before scaling the noise,
    # and a zero range (last image, constant scores) must fall back to scale 1.
    gen = torch.Generator().manual_seed(seed)
    B, N = 3, 49
    scores = 1e4 + torch.rand(B, N, generator=gen) * 1e-3
    scores[2] = 7.0
    noise = torch.rand(B, N, generator=gen)
    ratio = _ratios("per_image", B, gen)
    num_keep, cu, T, _ = _packing(ratio, B, N)
    ids, mask = K.abmg_select(scores, num_keep, cu, T, noise, True)
    _assert_selection(ids, mask, scores, ratio, noise, True)


def test_select_relative_noise_range_rounding_decides_a_tie(seed):
    # Hand-made: max - min = 0.5 - 2**-30 rounds to 0.5 in float32. With that scale patch 0 reaches
    # v = 0.25 + 0.5 * 0.5 = 0.5, tying patch 1 (v = 0.5), and wins the tie by index: patch 0 is
    # masked. An unrounded (float64) range would give patch 0 v = 0.5 - 2**-31 and mask patch 1.
    scores = torch.tensor([[0.25, 0.5, 2.0**-30]])
    noise = torch.tensor([[0.5, 0.0, 0.0]])
    num_keep, cu, T, _ = _packing(1 / 3, 1, 3)
    ids, mask = K.abmg_select(scores, num_keep, cu, T, noise, True)
    assert mask.tolist() == [[True, False, False]] and ids.tolist() == [1, 2]
    _assert_selection(ids, mask, scores, 1 / 3, noise, True)


def test_select_strided_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    B, N = 5, 49
    scores = torch.rand(N, B, generator=gen).t()  # (B, N) transposed view
    noise = torch.randn(B, 2 * N, generator=gen)[:, 1::2]
    ratio = _ratios("per_image", B, gen)
    num_keep, cu, T, _ = _packing(ratio, B, N)
    ids, mask = K.abmg_select(scores, num_keep, cu, T, noise, True)
    _assert_selection(ids, mask, scores, ratio, noise, True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_select_other_input_dtypes(seed, dtype):
    # Scores and noise of any float dtype are rounded to float32 first, as the reference does.
    gen = torch.Generator().manual_seed(seed)
    B, N = 3, 49
    scores = torch.rand(B, N, generator=gen, dtype=torch.float64).to(dtype)
    noise = torch.randn(B, N, generator=gen, dtype=torch.float64).to(dtype)
    ratio = _ratios("per_image", B, gen)
    num_keep, cu, T, _ = _packing(ratio, B, N)
    for relative in (False, True):
        ids, mask = K.abmg_select(scores, num_keep, cu, T, noise, relative)
        _assert_selection(ids, mask, scores, ratio, noise, relative)


# --------------------------------------------------------------------------------------------
# §3.3 / §3.4 gather, scatter, scatter backward
# --------------------------------------------------------------------------------------------


def _random_selection(B: int, N: int, gen: torch.Generator, device: str = "cpu"):
    ratio = torch.rand(B, generator=gen, dtype=torch.float64)
    if B >= 3:  # always include both extremes
        ratio[0], ratio[1] = 0.0, 1.0
    sel = R.abmg_select(torch.rand(B, N, generator=gen).to(device), ratio)
    return sel.ids_keep, sel.cu_seqlens, sel.mask, sel.max_seqlen


@pytest.mark.parametrize("B,N,D", [(1, 7, 1), (3, 49, 5), (5, 49, 24), (3, 196, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_matches_reference(seed, B, N, D, dtype):
    gen = torch.Generator().manual_seed(seed)
    ids, cu, _, max_len = _random_selection(B, N, gen)
    x = _noncontig_rows(B, N, D, dtype)
    out = K.gather_visible(x, ids, cu)
    assert out.dtype == dtype and out.shape == (ids.numel(), D)
    assert torch.equal(out, R.gather_visible(x, ids, cu))


@pytest.mark.parametrize("B,N,D", [(1, 7, 1), (3, 49, 5), (5, 49, 24), (3, 196, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scatter_matches_reference(seed, B, N, D, dtype):
    gen = torch.Generator().manual_seed(seed)
    ids, cu, mask, max_len = _random_selection(B, N, gen)
    T = ids.numel()
    y = torch.randn(T, 2 * D).to(dtype)[:, ::2]  # strided rows
    mask_token = torch.randn(D)  # float32, cast to y.dtype like the reference
    out = K.scatter_visible(y, ids, cu, mask_token, N)
    assert out.dtype == dtype and out.shape == (B, N, D)
    assert torch.equal(out, R.scatter_visible(y, ids, cu, mask_token, N))
    assert torch.equal(out[mask], mask_token.to(dtype).expand(int(mask.sum()), D))


@pytest.mark.parametrize("B,N,D", [(1, 7, 1), (3, 49, 5), (5, 49, 24), (3, 196, 5)])
def test_scatter_backward_matches_autograd(seed, B, N, D):
    gen = torch.Generator().manual_seed(seed)
    ids, cu, mask, max_len = _random_selection(B, N, gen)
    T = ids.numel()
    grad_out = _noncontig_rows(B, N, D)
    grad_y, grad_tok = K.scatter_visible_backward(grad_out, ids, cu, N)

    y = torch.randn(T, D, requires_grad=True)
    tok = torch.randn(D, requires_grad=True)
    R.scatter_visible(y, ids, cu, tok, N).backward(grad_out)
    assert grad_y.dtype == torch.float32 and grad_tok.dtype == torch.float32
    assert torch.equal(grad_y, y.grad)
    torch.testing.assert_close(grad_tok, tok.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scatter_backward_low_precision(seed, dtype):
    # grad_y is a bit-exact copy; the mask-token gradient accumulates in fp32 (vs a float64 sum).
    gen = torch.Generator().manual_seed(seed)
    B, N, D = 3, 49, 24
    ids, cu, mask, max_len = _random_selection(B, N, gen)
    grad_out = _noncontig_rows(B, N, D, dtype)
    grad_y, grad_tok = K.scatter_visible_backward(grad_out, ids, cu, N)
    assert grad_y.dtype == dtype and grad_tok.dtype == torch.float32
    assert torch.equal(grad_y, R.gather_visible(grad_out, ids, cu))
    expect = grad_out.double()[mask].sum(0)
    torch.testing.assert_close(grad_tok.double(), expect, rtol=1e-5, atol=1e-5)


def test_scatter_backward_nothing_masked(seed):
    B, N, D = 3, 7, 5
    ids = torch.arange(N).repeat(B)
    cu = torch.arange(B + 1, dtype=torch.int32) * N
    grad_out = torch.randn(B, N, D)
    grad_y, grad_tok = K.scatter_visible_backward(grad_out, ids, cu, N)
    assert torch.equal(grad_y, grad_out.reshape(B * N, D))
    assert torch.equal(grad_tok, torch.zeros(D))


# --------------------------------------------------------------------------------------------
# §3.5 fused
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "B,H,N,d,D", [(1, 1, 7, 4, 1), (3, 3, 49, 16, 5), (5, 3, 49, 4, 24), (3, 3, 196, 16, 24)]
)
@pytest.mark.parametrize("noise_mode", ["none", "absolute", "relative"])
def test_fused_matches_reference_composition(seed, B, H, N, d, D, noise_mode):
    gen = torch.Generator().manual_seed(seed)
    q_cls, k = _qk(B, H, N, d)
    x = _noncontig_rows(B, N, D)
    noise = None if noise_mode == "none" else 0.05 * torch.randn(B, N, generator=gen)
    relative = noise_mode == "relative"
    ratio = _ratios("per_image" if B < 3 else "extremes", B, gen)
    num_keep, cu, T, _ = _packing(ratio, B, N)

    visible, ids, mask, inv = K.abmg_mask_and_gather(q_cls, k, x, num_keep, cu, T, noise, relative)
    assert visible.shape == (T, D) and visible.dtype == x.dtype

    # 1) Exactly the reference selection of the kernel's own scores (cls_attention_scores runs the same
    #    kernels), an exact gather, the inverse map, and the backward through it.
    scores = K.cls_attention_scores(q_cls, k)
    _assert_selection(ids, mask, scores, ratio, noise, relative)
    assert torch.equal(visible, R.gather_visible(x, ids, cu))
    _assert_inverse(inv, ids, cu, mask)
    g = torch.randn(T, 2 * D, generator=gen)[:, ::2]  # strided rows, as autograd may hand them over
    assert torch.equal(K.unpack_rows(g, inv), R.scatter_visible(g, ids, cu, torch.zeros(D), N))

    # 2) The pure reference composition agrees wherever fp32 rounding of the scores (< 1e-5) cannot
    #    swap the boundary pair.
    ref_visible, ref = R.abmg_mask_and_gather(q_cls, k, x, ratio, noise, relative)
    ref_scores = R.cls_attention_scores(q_cls, k)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    safe = boundary_gap(R.selection_values(ref_scores, noise, relative), num_keep) > 1e-4
    assert torch.equal(mask[safe], ref.mask[safe])
    if bool(safe.all()):
        assert torch.equal(ids, ref.ids_keep) and torch.equal(visible, ref_visible)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_low_precision_inputs(seed, dtype):
    # q/k/x in bf16/fp16: scores accumulate in fp32 (the interpreter only converts, which is all the
    # kernels do with these dtypes), and visible rows are bit-exact copies.
    gen = torch.Generator().manual_seed(seed)
    B, H, N, d, D = 3, 3, 49, 16, 24
    q_cls, k = _qk(B, H, N, d, dtype)
    x = _noncontig_rows(B, N, D, dtype)
    noise = 0.05 * torch.randn(B, N, generator=gen)
    ratio = _ratios("per_image", B, gen)
    num_keep, cu, T, _ = _packing(ratio, B, N)
    scores = K.cls_attention_scores(q_cls, k)
    torch.testing.assert_close(scores, R.cls_attention_scores(q_cls, k), rtol=1e-5, atol=1e-5)
    visible, ids, mask, inv = K.abmg_mask_and_gather(q_cls, k, x, num_keep, cu, T, noise, True)
    assert visible.dtype == dtype
    _assert_selection(ids, mask, scores, ratio, noise, True)
    assert torch.equal(visible, R.gather_visible(x, ids, cu))


def test_fused_tied_scores_follow_index_order(seed):
    # q = 0 gives every key the same logit, so all scores tie exactly (1/(N+1)): the selection must
    # mask the lowest N-keep indices of every image.
    B, H, N, d, D = 3, 3, 49, 16, 5
    _, k = _qk(B, H, N, d)
    q_cls = torch.zeros(B, H, d)
    x = _noncontig_rows(B, N, D)
    ratio = torch.tensor([0.0, 0.6, 1.0], dtype=torch.float64)
    num_keep, cu, T, _ = _packing(ratio, B, N)
    visible, ids, mask, inv = K.abmg_mask_and_gather(q_cls, k, x, num_keep, cu, T, None, False)
    assert torch.equal(mask, torch.arange(N)[None, :] < (N - num_keep)[:, None])
    assert torch.equal(visible, torch.cat([x[b, N - int(num_keep[b]) :] for b in range(B)]))
    # hand-written inverse map: image b keeps its last num_keep patches at rows cu[b]..
    for b in range(B):
        keep, start = int(num_keep[b]), int(cu[b])
        want = torch.full((N,), -1, dtype=torch.int32)
        want[N - keep :] = torch.arange(start, start + keep, dtype=torch.int32)
        assert torch.equal(inv[b], want)


def test_fused_grouped_keys_heavy_ties(seed):
    # Keys drawn from 2 distinct vectors -> exactly 2 distinct score values per image (identical
    # arithmetic per lane), plus tied noise: the tie rule decides, and must match the reference.
    gen = torch.Generator().manual_seed(seed)
    B, H, N, d, D = 5, 3, 49, 4, 5
    q_cls = torch.randn(B, H, d, generator=gen)
    protos = torch.randn(B, H, 2, d, generator=gen)
    pick = torch.randint(0, 2, (B, N), generator=gen)
    keys = torch.gather(protos, 2, pick[:, None, :, None].expand(B, H, N, d))
    k = torch.cat([torch.randn(B, H, 1, d, generator=gen), keys], dim=2)
    x = _noncontig_rows(B, N, D)
    noise = torch.randint(0, 2, (B, N), generator=gen).float()
    ratio = _ratios("per_image", B, gen)
    num_keep, cu, T, _ = _packing(ratio, B, N)
    for nz, rel in ((None, False), (noise, False), (noise, True)):
        visible, ids, mask, inv = K.abmg_mask_and_gather(q_cls, k, x, num_keep, cu, T, nz, rel)
        scores = K.cls_attention_scores(q_cls, k)
        assert all(scores[b].unique().numel() <= 2 for b in range(B))
        _assert_selection(ids, mask, scores, ratio, nz, rel)
        assert torch.equal(visible, R.gather_visible(x, ids, cu))


# --------------------------------------------------------------------------------------------
# Bounds: every launcher at odd shapes under the interpreter memcheck (tests/interpreter_memcheck.py)
# --------------------------------------------------------------------------------------------
# The conftest fixture checks every launch of every test; these cases add the shapes where a dropped
# bounds term reads past a tensor without changing any output (D not a power of two: the column tile
# is wider than the row, N odd: the row tile is taller than the image, D > 256: a second column block)
# and hand every input to the kernels as a view at the start of a larger buffer (`padded`), so the
# first element past a tensor's end is nobody's and an overrun is caught wherever the allocator put
# the next tensor. Issue 22: dropping `& d_ok` from the scatter's y load only shows up here.


def _padded_selection(B: int, N: int, gen: torch.Generator):
    ids, cu, mask, _ = _random_selection(B, N, gen)
    return padded(ids), padded(cu), mask


@pytest.mark.parametrize("B,N,D", [(3, 37, 37), (4, 49, 65), (2, 7, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copies_stay_in_bounds_at_odd_shapes(seed, B, N, D, dtype):
    gen = torch.Generator().manual_seed(seed)
    ids, cu, mask = _padded_selection(B, N, gen)
    T = ids.numel()
    with memcheck() as mc:
        for x in (padded(torch.randn(B, N, D).to(dtype)), padded(_noncontig_rows(B, N, D, dtype))):
            assert torch.equal(K.gather_visible(x, ids, cu), R.gather_visible(x, ids, cu))
        tok = padded(torch.randn(D).to(dtype))  # already y's dtype: the launcher passes this very view
        for y in (padded(torch.randn(T, D).to(dtype)), padded(torch.randn(T, 2 * D).to(dtype)[:, ::2])):
            assert torch.equal(K.scatter_visible(y, ids, cu, tok, N), R.scatter_visible(y, ids, cu, tok, N))
        grad_out = padded(_noncontig_rows(B, N, D, dtype))
        grad_y, _ = K.scatter_visible_backward(grad_out, ids, cu, N)
        assert torch.equal(grad_y, R.gather_visible(grad_out, ids, cu))
        inv = padded(K.inverse_map(ids, cu, N))
        for y in (padded(torch.randn(T, D).to(dtype)), padded(torch.randn(T, 2 * D).to(dtype)[:, ::2])):
            assert torch.equal(K.unpack_rows(y, inv), R.scatter_visible(y, ids, cu, torch.zeros(D), N))
    assert {"_gather_kernel", "_inverse_kernel", "_scatter_kernel", "_scatter_bwd_kernel"} <= set(mc.launches)


@pytest.mark.parametrize("B,H,N,d,D", [(3, 2, 37, 5, 37), (2, 3, 49, 37, 65)])
def test_scores_selection_and_fused_stay_in_bounds_at_odd_shapes(seed, B, H, N, d, D):
    gen = torch.Generator().manual_seed(seed)
    q_cls, k = _qk(B, H, N, d)
    q_cls, k = padded(q_cls), padded(k)
    x = padded(_noncontig_rows(B, N, D))
    noise = padded(0.05 * torch.randn(B, 2 * N, generator=gen)[:, ::2])
    ratio = _ratios("per_image", B, gen)
    num_keep, cu, T, _ = _packing(ratio, B, N)
    num_keep, cu = padded(num_keep), padded(cu)
    with memcheck() as mc:
        scores = padded(K.cls_attention_scores(q_cls, k))
        for nz in (None, noise):
            ids, mask = K.abmg_select(scores, num_keep, cu, T, nz, True)
            _assert_selection(ids, mask, scores, ratio, nz, True)
            visible, ids_f, mask_f, inv = K.abmg_mask_and_gather(q_cls, k, x, num_keep, cu, T, nz, True)
            assert torch.equal(ids_f, ids) and torch.equal(visible, R.gather_visible(x, ids, cu))
            g = padded(torch.randn(T, D))
            assert torch.equal(K.unpack_rows(g, padded(inv)), R.scatter_visible(g, ids, cu, torch.zeros(D), N))
    assert {"_head_probs_kernel", "_scores_mean_kernel", "_select_kernel", "_rank_kernel"} <= set(mc.launches)


def test_bad_selections_are_refused_without_an_out_of_bounds_access(seed):
    # "Bad input never reads or writes out of bounds" (kernels/gather.py): ids outside [0, N), a
    # repeated id, cu_seqlens that decrease, overshoot T or do not start at 0 — each refused, and the
    # memcheck sees no access outside the arguments on the way.
    B, N, D = 3, 37, 37
    x = padded(torch.randn(B, N, D))
    ok_ids = torch.arange(12) % N
    ok_cu = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    bad = [(torch.where(torch.arange(12) == 5, N + 100, ok_ids), ok_cu),
           (torch.where(torch.arange(12) == 7, -3, ok_ids), ok_cu),
           (torch.where(torch.arange(12) == 1, 0, ok_ids), ok_cu),  # repeated within image 0 (scatter only)
           (ok_ids, torch.tensor([0, 8, 4, 12], dtype=torch.int32)),
           (ok_ids, torch.tensor([0, 4, 8, 1000], dtype=torch.int32)),
           (ok_ids, torch.tensor([3, 4, 8, 12], dtype=torch.int32))]
    with memcheck():
        for i, (ids, cu) in enumerate(bad):
            ids, cu = padded(ids), padded(cu)
            y, tok = padded(torch.randn(12, D)), padded(torch.randn(D))
            if i != 2:
                with pytest.raises(ValueError, match="not a valid packed selection"):
                    K.gather_visible(x, ids, cu)
            with pytest.raises(ValueError, match="not a valid packed selection"):
                K.scatter_visible(y, ids, cu, tok, N)
            with pytest.raises(ValueError, match="not a valid packed selection"):
                K.scatter_visible_backward(x, ids, cu, N)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the degenerate box, in NumPy
@pytest.mark.parametrize("grid", [(3, 5), (7, 7)])
def test_saliency_kernels_stay_in_bounds(seed, grid):
    from amgsn.kernels import saliency as KS

    gen = torch.Generator().manual_seed(seed)
    (Gh, Gw), M, B = grid, 9, 5
    bank = padded(torch.rand(M, Gh, Gw, generator=gen).half())
    idx = padded(torch.randperm(M, generator=gen)[:B])
    boxes = padded(torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.7, 0.6, 0.3, 0.4], [0.1, 0.2, 0.5, 0.3],
                                 [0.0, 0.0, 0.0, 0.0], [0.9, 0.9, 0.5, 0.5]]))  # a degenerate box, one past the edge
    flips, fresh = padded(torch.tensor([False, True, False, True, True])), padded(torch.rand(B, generator=gen) < 0.5)
    scores = padded(torch.randn(B, Gh * Gw, generator=gen))
    with memcheck() as mc:
        KS.saliency_bank_read(bank, idx, boxes, flips)
        KS.saliency_bank_write_(bank, idx, scores, boxes, flips, fresh, 0.5)
        bad = padded(torch.tensor([0, M + 3, -1, 2, M]))  # rows outside the bank: refused, never touched
        with pytest.raises(ValueError, match="indices"):
            KS.saliency_bank_read(bank, bad, boxes, flips)
        with pytest.raises(ValueError, match="indices"):
            KS.saliency_bank_write_(bank, bad, scores, boxes, flips, fresh, 0.5)
    assert mc.launches.keys() >= {"_read_kernel", "_write_kernel"}


def test_cuda_tests_fail_under_the_interpreter():
    # conftest's guard: this session runs the interpreter, so a cuda-marked test must fail, not pass.
    import conftest

    class Item:
        keywords = {"cuda": True}

    assert conftest.triton_interpreter_on()
    with pytest.raises(pytest.fail.Exception, match="TRITON_INTERPRET=0"):
        conftest.require_compiled_kernels(Item())
    conftest.require_compiled_kernels(type("Plain", (), {"keywords": {}})())  # other tests are not affected


# --------------------------------------------------------------------------------------------
# CUDA (run by benchmarks/gpu_check.sh): same comparisons in bf16/fp16/fp32, and the benchmark shape
# --------------------------------------------------------------------------------------------

_CUDA_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _cuda_case(B, H, N, d, D, dtype, ratio, noise_mode, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q_cls, k = _qk(B, H, N, d, dtype, "cuda")
    x = _noncontig_rows(B, N, D, dtype, "cuda")
    noise = None if noise_mode == "none" else 0.05 * torch.randn(B, N, device="cuda", generator=gen)
    relative = noise_mode == "relative"
    num_keep, cu, T, max_len = _packing(ratio, B, N, "cuda")

    scores = K.cls_attention_scores(q_cls, k)
    torch.testing.assert_close(scores, R.cls_attention_scores(q_cls, k), rtol=1e-5, atol=1e-5)
    ids_s, mask_s = K.abmg_select(scores, num_keep, cu, T, noise, relative)
    ratio_dev = ratio.to("cuda") if isinstance(ratio, torch.Tensor) else ratio
    _assert_selection(ids_s, mask_s, scores, ratio_dev, noise, relative)

    # Heavy ties and signed zeros (3 levels, zeros with random signs): the index order decides.
    tied = torch.randint(0, 3, (B, N), device="cuda", generator=gen).float() - 1.0
    tied = torch.where(tied == 0, torch.where(torch.rand_like(tied) < 0.5, -0.0, 0.0), tied)
    ids_t, mask_t = K.abmg_select(tied, num_keep, cu, T, None if noise is None else noise.round(), relative)
    _assert_selection(ids_t, mask_t, tied, ratio_dev, None if noise is None else noise.round(), relative)

    visible, ids, mask, inv = K.abmg_mask_and_gather(q_cls, k, x, num_keep, cu, T, noise, relative)
    # The fused op ranks the scores of the very kernels cls_attention_scores runs: identical selection.
    assert torch.equal(mask, mask_s) and torch.equal(ids, ids_s)
    assert torch.equal(visible, R.gather_visible(x, ids, cu))
    _assert_inverse(inv, ids, cu, mask)
    g = torch.randn(T, D, device="cuda").to(dtype)
    assert torch.equal(K.unpack_rows(g, inv), R.scatter_visible(g, ids, cu, torch.zeros(D, device="cuda"), N))

    assert torch.equal(K.gather_visible(x, ids, cu), R.gather_visible(x, ids, cu))
    y = torch.randn(T, D, device="cuda").to(dtype)
    tok = torch.randn(D, device="cuda")
    assert torch.equal(K.scatter_visible(y, ids, cu, tok, N), R.scatter_visible(y, ids, cu, tok, N))
    grad_out = _noncontig_rows(B, N, D, dtype, "cuda")
    grad_y, grad_tok = K.scatter_visible_backward(grad_out, ids, cu, N)
    assert torch.equal(grad_y, R.gather_visible(grad_out, ids, cu))
    torch.testing.assert_close(grad_tok.double(), grad_out.double()[mask].sum(0), rtol=1e-5, atol=1e-4)
    again = K.scatter_visible_backward(grad_out, ids, cu, N)[1]
    assert torch.equal(grad_tok, again)  # deterministic: no float atomics


# Each (dtype, shape) pair is one compiled variant set; the noise modes rotate over the shapes so every
# dtype sees all three without compiling 27 variants of each kernel.
_CUDA_SHAPES = [(5, 3, 49, 16, 24), (3, 12, 196, 64, 768), (2, 16, 784, 128, 1030)]
_NOISE_MODES = ["none", "absolute", "relative"]
_CUDA_CASES = [
    (dtype, shape, _NOISE_MODES[(i + j) % 3])
    for i, dtype in enumerate(_CUDA_DTYPES)
    for j, shape in enumerate(_CUDA_SHAPES)
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,shape,noise_mode", _CUDA_CASES)
def test_cuda_kernels_match_reference(seed, dtype, shape, noise_mode):
    B = shape[0]
    ratio = torch.rand(B, dtype=torch.float64)
    ratio[0] = 0.0
    ratio[-1] = 1.0
    _cuda_case(*shape, dtype, ratio, noise_mode, seed)


@pytest.mark.cuda
def test_cuda_benchmark_shape(seed):
    # The benchmark of docs/method.md §9: B=256, H=12, N=196, d=64, D=768, bf16, ratios in [0.5, 0.9].
    ratio = 0.5 + 0.4 * torch.rand(256, dtype=torch.float64)
    _cuda_case(256, 12, 196, 64, 768, torch.bfloat16, ratio, "relative", seed)
