"""The drop-in API for MAE / timm code (docs/method.md §3.9, issue 23): random_masking against MAE's own
algorithm (tests/mae_model.py), attention_masking against its reference, to_padded / from_padded against
PackedLayout, cls_query_keys against what a timm block's attention computes, errors that name the
culprit, and MaskSelection unpacking into the gathers. Float64 gradchecks: test_precision.py. The tests
that use only the ops also run on the Triton route (test_precision.py runs them in a subprocess)."""

from __future__ import annotations

import re

import pytest
import torch
from mae_model import TinyMAE, mae_random_masking, twin
from timm.models.vision_transformer import Attention, Block
from torch import nn

from amgsn import ops
from amgsn.models import PackedLayout, block_forward_packed, cls_query_keys
from amgsn.ops import masking
from amgsn.ops import reference as ref


def _params(full: list, route: list) -> list:
    """Parameters of a test that test_precision.py also runs on the Triton route (interpreted, ~50 ms a
    launch): there a representative few."""
    return route if masking.TRITON_ON_CPU else full


# ---------------------------------------------------------------------------------------------
# random_masking: MAE's, bit for bit
# ---------------------------------------------------------------------------------------------


def _noise(kind: str, B: int, L: int, gen: torch.Generator) -> torch.Tensor:
    noise = torch.rand(B, L, generator=gen)
    return torch.round(noise * 2) / 2 if kind == "ties" else noise  # three values: ties everywhere


@pytest.mark.parametrize("B,L", _params([(1, 16), (3, 49), (2, 7), (4, 197)], [(2, 7), (3, 49)]))
@pytest.mark.parametrize("ratio", _params([0.0, 0.3, 0.75, 0.9, 1.0], [0.0, 0.75, 1.0]))
@pytest.mark.parametrize("noise_kind", ["rand", "ties"])
def test_random_masking_is_maes(seed, B, L, ratio, noise_kind):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 5, L, generator=gen).transpose(1, 2)  # strided patches, D = 5
    noise = _noise(noise_kind, B, L, gen)
    got = ops.random_masking(x, ratio, noise)
    # MAE's argsort is unstable: with ties its order is open, and ours is the stable one (index first).
    want = mae_random_masking(x, ratio, noise, stable=noise_kind == "ties")
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    assert got[0].shape == (B, int(L * (1 - ratio)), 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_random_masking_dtypes_and_gradient(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 20, 6, generator=gen).to(dtype).requires_grad_()
    noise = torch.rand(3, 20, generator=gen).to(dtype if dtype == torch.float64 else torch.float32)
    got, want = ops.random_masking(x, 0.6, noise), mae_random_masking(x, 0.6, noise)
    assert all(torch.equal(g, w) for g, w in zip(got, want)) and got[0].dtype == dtype
    upstream = torch.randn(got[0].shape, generator=gen).to(dtype)
    assert torch.equal(torch.autograd.grad(got[0], x, upstream)[0], torch.autograd.grad(want[0], x, upstream)[0])


def test_random_masking_draws_maes_default_noise(seed):
    x = torch.randn(4, 49, 8)
    torch.manual_seed(seed)
    got = ops.random_masking(x, 0.75)
    torch.manual_seed(seed)
    want = mae_random_masking(x, 0.75)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("L,ratio,keep", [(20, 0.8, 3), (10, 0.8, 1), (196, 0.75, 49), (49, 0.5, 24), (16, 1.0, 0)])
def test_kept_count_is_maes_int_truncation(L, ratio, keep):
    # int(20 * (1 - 0.8)) = int(3.999999999999999) = 3: MAE's count, not abmg_select's floor(... + 1e-4) = 4.
    assert int(L * (1 - ratio)) == keep
    x = torch.randn(2, L, 3)
    q, k = torch.randn(2, 2, 4), torch.randn(2, 2, L + 1, 4)
    for x_masked, mask, ids_restore in (ops.random_masking(x, ratio), ops.attention_masking(x, q, k, ratio)):
        assert x_masked.shape == (2, keep, 3) and mask.shape == (2, L) and ids_restore.shape == (2, L)
        assert mask.sum(1).tolist() == [L - keep] * 2
        assert torch.equal(ids_restore.sort(1).values, torch.arange(L).expand(2, L))


def test_mae_model_with_our_random_masking_is_maes(seed):
    """Item 8: an MAE built from timm blocks (MAE's encoder, decoder and loss): our random_masking in
    place of MAE's gives, for the same noise, the same x_masked, mask, ids_restore, loss and gradients."""
    torch.manual_seed(seed)
    mae = TinyMAE()
    seen = {}

    def ours(self, x, mask_ratio):
        seen["ours"] = ops.random_masking(x, mask_ratio)
        return seen["ours"]

    def theirs(self, x, mask_ratio):
        seen["mae"] = mae_random_masking(x, mask_ratio)
        return seen["mae"]

    imgs = torch.randn(3, 3, 32, 32)
    results = {}
    for name, model in (("mae", twin(mae, random_masking=theirs)), ("ours", twin(mae, random_masking=ours))):
        torch.manual_seed(seed + 1)  # the same torch.rand noise for both
        loss, pred, mask = model(imgs, 0.75)
        results[name] = (loss, pred, mask, torch.autograd.grad(loss, list(mae.parameters())))
    for g, w in zip(seen["ours"], seen["mae"]):
        assert torch.equal(g, w)
    assert torch.equal(results["ours"][0], results["mae"][0])
    assert torch.equal(results["ours"][1], results["mae"][1]) and torch.equal(results["ours"][2], results["mae"][2])
    for g, w in zip(results["ours"][3], results["mae"][3]):
        assert torch.equal(g, w)


# ---------------------------------------------------------------------------------------------
# attention_masking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,H,L,d", _params([(1, 1, 16, 8), (3, 3, 49, 16), (2, 4, 37, 5)], [(2, 4, 37, 5)]))
@pytest.mark.parametrize("ratio", _params([0.0, 0.5, 0.75, 0.95], [0.0, 0.75]))
@pytest.mark.parametrize("relative", [False, True])
def test_attention_masking_matches_reference(seed, B, H, L, d, ratio, relative):
    # Noise of order 1 against scores of order 1/L: the ranking has gaps far above the scores' rounding
    # (the op's C++/Triton scores and the reference's einsum differ in the last bits), so all is exact.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 6, generator=gen)
    q, k = torch.randn(B, H, d, generator=gen), torch.randn(B, H, L + 1, d, generator=gen)
    noise = torch.rand(B, L, generator=gen)
    got = ops.attention_masking(x, q, k, ratio, noise, relative_noise=relative)
    want = ref.attention_masking(x, q, k, ratio, noise, relative)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("B,H,L,d", _params([(2, 3, 16, 8), (4, 12, 196, 64), (3, 2, 33, 4)], [(3, 2, 33, 4)]))
def test_attention_masking_removes_the_most_attended(seed, B, H, L, d):
    """Without noise: the removed set is the op's own selection of its own scores (bit-identical scores
    on both sides, so exact at any gap), with MAE's kept count; the kept patches come in index order."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 5, generator=gen, requires_grad=True)
    q, k = torch.randn(B, H, d, generator=gen), torch.randn(B, H, L + 1, d, generator=gen)
    x_masked, mask, ids_restore = ops.attention_masking(x, q, k, 0.75)
    keep = int(L * 0.25)
    scores = ops.cls_attention_scores(q, k)
    sel = ops.abmg_select(scores, 1 - keep / L)  # the same count through abmg_select's rule
    assert sel.max_seqlen == keep and torch.equal(mask.bool(), sel.mask)
    assert torch.equal(x_masked, ops.gather_visible(x, *sel).view(B, keep, 5))
    # every removed patch is attended at least as much as every kept one
    assert (scores.masked_fill(~sel.mask, float("inf")).amin(1) >= scores.masked_fill(sel.mask, -1).amax(1)).all()
    # MAE's decoder gather with ids_restore puts each kept token back where it came from
    index = ids_restore[..., None].expand(-1, -1, 5)
    full = torch.gather(torch.cat([x_masked, torch.zeros(B, L - keep, 5)], 1), 1, index)
    assert torch.equal(full[mask == 0], x[mask == 0]) and (full[mask == 1] == 0).all()


def test_attention_masking_uniform_attention_removes_lowest_indices():
    # q = 0: every logit is 0, every score 1/(L+1) — a full tie, broken by index: remove 0, 1, ...
    x = torch.randn(2, 10, 3)
    x_masked, mask, ids_restore = ops.attention_masking(x, torch.zeros(2, 2, 4), torch.randn(2, 2, 11, 4), 0.6)
    assert mask.tolist() == [[1.0] * 6 + [0.0] * 4] * 2
    assert torch.equal(x_masked, x[:, 6:]) and ids_restore.tolist() == [[4, 5, 6, 7, 8, 9, 0, 1, 2, 3]] * 2


# ---------------------------------------------------------------------------------------------
# MaskSelection unpacking, mask_token shapes, to_padded / from_padded
# ---------------------------------------------------------------------------------------------


def test_selection_unpacks_into_the_gathers(seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, D = 3, 21, 4
    sel = ops.abmg_select(torch.rand(B, N, generator=gen), torch.tensor([0.1, 0.5, 0.9]))
    x = torch.randn(B, N, D, generator=gen)
    visible = ops.gather_visible(x, *sel)
    assert torch.equal(visible, ref.gather_visible(x, sel.ids_keep, sel.cu_seqlens))
    token = torch.randn(1, 1, D, generator=gen, requires_grad=True)  # MAE's mask_token parameter
    full = ops.scatter_visible(visible, *sel, mask_token=token)
    assert torch.equal(full, ops.scatter_visible(visible, sel.ids_keep, sel.cu_seqlens, token.reshape(D), N))
    assert torch.equal(full, ref.scatter_visible(visible, sel.ids_keep, sel.cu_seqlens, token.reshape(D), N))
    (g,) = torch.autograd.grad(full.sum(), token)
    assert g.shape == (1, 1, D) and torch.equal(g, torch.full((1, 1, D), float(sel.mask.sum())))


def _packing(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("lengths", _params([[3, 1, 4], [5], [2, 0, 7, 1], [1, 1]], [[2, 0, 7, 1]]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", [0, 2])
def test_to_from_padded_match_packed_layout(seed, lengths, dtype, extra):
    gen = torch.Generator().manual_seed(seed)
    cu = _packing(lengths)
    L = max(lengths) + extra
    visible = torch.randn(sum(lengths), 3, generator=gen).to(dtype).requires_grad_()
    padded, key_valid = ops.to_padded(visible, cu, L if extra else None)
    layout = PackedLayout.from_cu_seqlens(cu, L)
    assert torch.equal(padded, layout.pad(visible)) and torch.equal(key_valid, layout.valid)
    back = ops.from_padded(padded, cu)
    assert torch.equal(back, visible)
    g = torch.randn(padded.shape, generator=gen).to(dtype)
    assert torch.equal(torch.autograd.grad(padded, visible, g)[0], layout.unpad(g))


def test_packed_and_padded_timm_blocks_agree(seed):
    gen = torch.Generator().manual_seed(seed)
    blocks = nn.ModuleList(Block(24, 3, qkv_bias=True) for _ in range(2)).eval()
    sel = ops.abmg_select(torch.rand(5, 16, generator=gen), torch.rand(5, generator=gen))
    visible = ops.gather_visible(torch.randn(5, 16, 24, generator=gen), *sel)
    layout = PackedLayout.from_cu_seqlens(sel.cu_seqlens, sel.max_seqlen)
    padded, key_valid = ops.to_padded(visible, sel.cu_seqlens, sel.max_seqlen)
    packed = visible
    for blk in blocks:
        packed = block_forward_packed(blk, packed, layout)
        padded = blk(padded, attn_mask=key_valid[:, None, None, :])
    torch.testing.assert_close(ops.from_padded(padded, sel.cu_seqlens), packed, atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph(seed):
    B, L, D = 3, 16, 8

    def step(x, noise, q, k, token):
        xr, mask_r, ids_r = ops.random_masking(x, 0.75, noise)
        xa, mask_a, ids_a = ops.attention_masking(x, q, k, 0.5, noise)
        sel = ops.abmg_select(noise, 0.25)
        padded, valid = ops.to_padded(ops.gather_visible(x, *sel), sel.cu_seqlens, sel.max_seqlen)
        back = ops.from_padded(padded * 2, sel.cu_seqlens, B * sel.max_seqlen)
        full = ops.scatter_visible(back, *sel, mask_token=token)
        return xr.square().sum() + xa.sum() + full.square().sum() + (ids_r + ids_a).sum() + mask_r.sum() + mask_a.sum()

    x = torch.randn(B, L, D, requires_grad=True)
    token = torch.randn(1, 1, D, requires_grad=True)
    args = (torch.rand(B, L), torch.randn(B, 2, 4), torch.randn(B, 2, L + 1, 4), token)
    eager = step(x, *args)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x, *args)
    torch.testing.assert_close(out, eager)
    for g, w in zip(torch.autograd.grad(out, (x, token)), torch.autograd.grad(eager, (x, token))):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------------------------
# Errors name the culprit
# ---------------------------------------------------------------------------------------------


def _error_cases():
    B, N, D = 2, 9, 4
    x, q, k = torch.randn(B, N, D), torch.randn(B, 2, 4), torch.randn(B, 2, N + 1, 4)
    sel = ops.abmg_select(torch.rand(B, N), 0.5)
    visible = ops.gather_visible(x, *sel)
    tok = torch.zeros(D)
    with_cls = torch.randn(B, N + 1, D)
    return [
        # k without its CLS key: k has N keys for x's N patches -> the error names k (and the other cause)
        ("^k has 9 keys .* x still holds its CLS token", lambda: ops.attention_masking(x, q, k[:, :, 1:], 0.5)),
        ("^k has 9 keys", lambda: ops.abmg_mask_and_gather(q, k[:, :, 1:], x, 0.5)),
        ("^x must be", lambda: ops.abmg_mask_and_gather(q, k, x[:, :-2], 0.5)),
        ("^x has 10 tokens per image .* CLS token", lambda: ops.gather_visible(with_cls, *sel)),
        ("^x must be", lambda: ops.gather_visible(x[:1], *sel)),
        ("^mask must have dtype", lambda: ops.gather_visible(x, *sel[:3], sel.mask.int())),
        ("^mask_token must have shape", lambda: ops.scatter_visible(visible, *sel, mask_token=torch.zeros(2, D))),
        ("^mask_token must have shape", lambda: ops.scatter_visible(visible, *sel, mask_token=tok[None, None, :-1])),
        ("needs mask_token", lambda: ops.scatter_visible(visible, *sel)),
        ("^N = 10 does not match", lambda: ops.scatter_visible(visible, *sel, mask_token=tok, N=N + 1)),
        ("multiple values for max_seqlen", lambda: ops.scatter_visible(visible, *sel, max_seqlen=3, mask_token=tok)),
        ("^mask_ratio must be a float", lambda: ops.random_masking(x, torch.tensor([0.5, 0.5]))),
        ("^mask_ratio must lie in", lambda: ops.random_masking(x, 1.5)),
        ("^mask_ratio must be a float", lambda: ops.attention_masking(x, q, k, True)),
        ("^noise must have the shape", lambda: ops.random_masking(x, 0.5, torch.rand(B, N + 1))),
        ("^x must have 3 dimensions", lambda: ops.random_masking(x[0], 0.5)),
        ("^visible must have 2 dimensions", lambda: ops.to_padded(x, sel.cu_seqlens)),
        ("^max_seqlen = 2 is less than", lambda: ops.to_padded(visible, sel.cu_seqlens, 2)),
        ("^cu_seqlens must end at T", lambda: ops.to_padded(visible[:-1], sel.cu_seqlens)),
        ("^cu_seqlens must have dtype", lambda: ops.from_padded(x, sel.cu_seqlens.long())),
        ("^cu_seqlens must have B \\+ 1 = 3", lambda: ops.from_padded(x, sel.cu_seqlens[:-1])),
        ("^block must be a timm Block", lambda: cls_query_keys(nn.Linear(4, 4), x)),
        ("^x must have D = 12", lambda: cls_query_keys(Block(12, 2), with_cls)),
        ("^x must be \\(B, 1\\+N, D\\)", lambda: cls_query_keys(Block(4, 2), x[:, :1])),
    ]


@pytest.mark.parametrize("case", range(len(_error_cases())))
def test_errors_name_the_culprit(case):
    pattern, call = _error_cases()[case]
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert re.search(pattern, str(info.value)), str(info.value)


# ---------------------------------------------------------------------------------------------
# cls_query_keys: what a timm block's attention uses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,dim,qkv_bias,qk_norm", [(1, 16, False, False), (3, 48, True, True),
                                                        (4, 32, True, False), (6, 36, False, True)])
@pytest.mark.parametrize("module", ["block", "attention"])
def test_cls_query_keys_are_the_blocks(seed, heads, dim, qkv_bias, qk_norm, module):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    block = Block(dim, heads, qkv_bias=qkv_bias, qk_norm=qk_norm) if module == "block" else None
    attn = block.attn if block is not None else Attention(dim, heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                                                          norm_layer=nn.LayerNorm)
    if qk_norm:  # non-trivial norm parameters
        for norm in (attn.q_norm, attn.k_norm):
            nn.init.normal_(norm.weight, 1.0, 0.3)
            nn.init.normal_(norm.bias, 0.0, 0.3)
    attn.fused_attn = False  # so timm materialises the attention matrix we compare against
    seen = {}

    def record(name):
        def hook(module, inputs, output):  # returns None: the output is left as it is
            seen[name] = output.detach().clone()

        return hook

    hooks = [attn.q_norm.register_forward_hook(record("q")), attn.k_norm.register_forward_hook(record("k")),
             attn.attn_drop.register_forward_hook(record("attn"))]
    x = torch.randn(3, 1 + 15, dim, generator=gen)
    (block or attn)(x)
    for hook in hooks:
        hook.remove()
    q_cls, k = cls_query_keys(block or attn, x)
    seen_q, seen_k, seen_attn = seen["q"], seen["k"], seen["attn"]  # (B, H, 1+N, ·) from timm's forward
    assert q_cls.shape == (3, heads, dim // heads) and k.shape == (3, heads, 16, dim // heads)
    torch.testing.assert_close(q_cls, seen_q[:, :, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(k, seen_k, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ops.cls_attention_scores(q_cls, k), seen_attn[:, :, 0, 1:].mean(1), atol=1e-7, rtol=1e-5)
    q_all, _ = cls_query_keys(block or attn, x, all_queries=True)
    torch.testing.assert_close(q_all, seen_q, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# CUDA (run by benchmarks/gpu_check.sh): the same results as the CPU route, float64 kept, gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_dropin_matches_cpu(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    B, H, L, d, D = 4, 3, 196, 16, 24
    x = torch.randn(B, L, D, generator=gen).to(dtype)
    q, k = torch.randn(B, H, d, generator=gen).to(dtype), torch.randn(B, H, L + 1, d, generator=gen).to(dtype)
    noise = torch.rand(B, L, generator=gen)  # large next to the scores: no near-ties between devices
    for fn, args in ((ops.random_masking, (0.75, noise)), (ops.attention_masking, (q, k, 0.75, noise))):
        cpu = fn(x, *args)
        xc = x.cuda().requires_grad_()
        got = fn(xc, *(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
        for g, w in zip(got, cpu):
            assert g.device.type == "cuda" and torch.equal(g.cpu(), w)
        (gx,) = torch.autograd.grad(got[0], xc, torch.ones_like(got[0]))
        assert torch.equal(gx.cpu(), (1 - cpu[1]).to(dtype)[..., None].expand(B, L, D))
    sel = ops.abmg_select(torch.rand(B, L, generator=gen), torch.rand(B, generator=gen))
    visible = ops.gather_visible(x, *sel)
    sel_c = ref.MaskSelection(sel.ids_keep.cuda(), sel.cu_seqlens.cuda(), sel.max_seqlen, sel.mask.cuda())
    padded, valid = ops.to_padded(visible.cuda(), sel_c.cu_seqlens, sel_c.max_seqlen)
    want_padded, want_valid = ops.to_padded(visible, sel.cu_seqlens, sel.max_seqlen)
    assert torch.equal(padded.cpu(), want_padded) and torch.equal(valid.cpu(), want_valid)
    assert torch.equal(ops.from_padded(padded, sel_c.cu_seqlens, visible.shape[0]).cpu(), visible)


@pytest.mark.cuda
def test_cuda_float64_gradcheck_and_precision(seed):
    from torch.autograd import gradcheck

    gen = torch.Generator().manual_seed(seed)
    B, H, L, d = 2, 2, 9, 4
    x = torch.randn(B, L, 3, dtype=torch.float64, generator=gen).cuda().requires_grad_()
    q = torch.randn(B, H, d, dtype=torch.float64, generator=gen).cuda()
    k = torch.randn(B, H, L + 1, d, dtype=torch.float64, generator=gen).cuda()
    noise = torch.rand(B, L, dtype=torch.float64, generator=gen).cuda()
    assert ops.cls_attention_scores(q, k).dtype == torch.float64
    torch.testing.assert_close(ops.cls_attention_scores(q, k), ref.cls_attention_scores(q, k), atol=1e-15, rtol=1e-13)
    assert gradcheck(lambda t: ops.random_masking(t, 0.5, noise)[0], (x,))
    assert gradcheck(lambda t: ops.attention_masking(t, q, k, 0.5, noise)[0], (x,))
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32, device="cuda")
    v = torch.randn(7, 2, dtype=torch.float64, device="cuda", requires_grad=True)
    assert gradcheck(lambda t: ops.from_padded(ops.to_padded(t, cu, 5)[0] * 2, cu, 7), (v,))
