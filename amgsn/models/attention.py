"""Variable-length self-attention over packed sequences, behind a small backend interface.

Packed layout: the tokens of B sequences are concatenated along dim 0, ``cu_seqlens`` (B+1,) holds
the prefix sums of their lengths (starting at 0), and every token attends only to the tokens of its
own sequence. ``q``, ``k``, ``v`` and the output are (T, H, d), T = ``cu_seqlens[-1]``.

Backends (:data:`BACKENDS`):

* ``torch_varlen`` — ``torch.nn.attention.varlen.varlen_attn`` (Flash/cuDNN; CUDA, fp16/bf16 only).
  Called with its seven positional arguments only, the part of the signature that torch 2.10–2.14
  share; checked once per (device, dtype) against the padded path before first use.
* ``flex`` — FlexAttention with a document mask (CUDA; compiled; forward-and-backward).
* ``xformers`` — ``memory_efficient_attention`` with a block-diagonal bias; used only if xformers
  imports and passes the same self-check (docs/method.md §8: the PyPI wheel does not load with torch 2.14).
* ``sdpa_padded`` — any device: pad to ``max_seqlen``, one ``scaled_dot_product_attention`` call
  with a key-padding mask, unpad.
* ``sdpa_per_seq`` — any device: one SDPA call per sequence (no padded compute, a Python loop).
* ``auto`` — CUDA: ``torch_varlen`` for half precision when it works, else ``flex``, else
  ``sdpa_padded``; CPU: :data:`CPU_AUTO_BACKEND` (the faster of the two SDPA paths, measured on
  the dev machine: see its comment).

:class:`PackedLayout` holds the index maps of one ``cu_seqlens``; build it once per forward pass and
pass it to every block so the padding indices are not recomputed per layer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from amgsn.ops._checks import check_tensor

BACKENDS = ("auto", "torch_varlen", "flex", "xformers", "sdpa_padded", "sdpa_per_seq")

# Measured on the 2-core dev machine (torch 2.14.1, fp32, forward + backward of one attention layer
# of ViT-Tiny at 112 px / patch 8 under per-image ratios 0.5..0.9: B=64 sequences of 20..99 tokens,
# H=3, d=64): sdpa_padded 41 ms, sdpa_per_seq 81 ms — the loop's 64 small calls cost more than the
# padded compute they save.
CPU_AUTO_BACKEND = "sdpa_padded"


@dataclass
class PackedLayout:
    """Index maps between a packed (T, ...) tensor and its padded (B, L, ...) form.

    cu_seqlens:  (B+1,) int32 prefix sums; max_seqlen: L, an upper bound of every length.
    seqlens:     (B,) int64 lengths.  token_batch: (T,) int64 sequence of each token.
    pad_index:   (T,) int64 position of each token in the flattened (B*L) padded buffer.
    valid:       (B, L) bool, True where the padded buffer holds a real token.
    pad_sequences: how many of the B sequences, at the end, only hold padding rows (the bucketed
                 shapes of ``--compile``, :mod:`amgsn.models.regions`): attention keeps them to
                 themselves like any sequence, and nothing reads their rows afterwards.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    seqlens: torch.Tensor
    token_batch: torch.Tensor
    pad_index: torch.Tensor
    valid: torch.Tensor
    # Per-backend caches (e.g. a FlexAttention block mask), keyed by backend name.
    cache: dict = field(default_factory=dict, repr=False)
    pad_sequences: int = 0

    @property
    def batch_size(self) -> int:
        return self.seqlens.numel()

    @property
    def total(self) -> int:
        return self.token_batch.numel()

    @classmethod
    def from_cu_seqlens(
        cls, cu_seqlens: torch.Tensor, max_seqlen: int, validate: bool = True, total: int | None = None
    ) -> PackedLayout:
        """Build the maps; ``validate`` checks ``cu_seqlens`` (non-decreasing, starts at 0, lengths
        <= max_seqlen, ends at ``total`` if given) — it reads the values, which synchronises a CUDA
        device. ``total`` = T when the caller knows it (saves reading ``cu_seqlens[-1]``)."""
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
        if cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must have at least 2 entries (B+1), got {cu_seqlens.numel()}")
        if not isinstance(max_seqlen, int) or max_seqlen < 1:
            raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
        cu = cu_seqlens.long()
        seqlens = cu[1:] - cu[:-1]
        if validate:
            if int(cu[0]) != 0:
                raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
            if bool((seqlens < 0).any()):
                raise ValueError("cu_seqlens must be non-decreasing")
            if int(seqlens.max()) > max_seqlen:
                raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence "
                                 f"({int(seqlens.max())}) in cu_seqlens")
            if total is not None and int(cu[-1]) != total:
                raise ValueError(f"cu_seqlens ends at {int(cu[-1])}, expected {total} tokens")
        B = seqlens.numel()
        T = int(cu[-1]) if total is None else int(total)
        token_batch = torch.repeat_interleave(torch.arange(B, device=cu.device), seqlens, output_size=T)
        pos = torch.arange(T, device=cu.device) - cu[:-1][token_batch]
        pad_index = token_batch * max_seqlen + pos
        valid = torch.arange(max_seqlen, device=cu.device)[None, :] < seqlens[:, None]
        return cls(cu_seqlens, max_seqlen, seqlens, token_batch, pad_index, valid)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(T, *rest) -> (B, L, *rest), zeros at padded positions. Differentiable."""
        buf = x.new_zeros((self.batch_size * self.max_seqlen, *x.shape[1:]))
        return buf.index_copy(0, self.pad_index, x).unflatten(0, (self.batch_size, self.max_seqlen))

    def unpad(self, xp: torch.Tensor) -> torch.Tensor:
        """(B, L, *rest) -> (T, *rest): the real tokens, in packed order. Differentiable."""
        return xp.flatten(0, 1).index_select(0, self.pad_index)


# --------------------------------------------------------------------------------------------
# Backends. Each takes q, k, v (T, H, d) and a PackedLayout and returns (T, H, d).
# --------------------------------------------------------------------------------------------


def _sdpa_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    # (B, L, H, d) -> (B, H, L, d); the mask hides padded keys. Padded *queries* still see their
    # sequence's real keys (every sequence has >= 1 token), so no row is all -inf; they are dropped.
    qp, kp, vp = (layout.pad(t).transpose(1, 2) for t in (q, k, v))
    mask = layout.valid[:, None, None, :]
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
    return layout.unpad(out.transpose(1, 2))


def _sdpa_per_seq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    bounds = layout.cu_seqlens.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, n, d)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def _torch_varlen_fn() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch without the varlen module
        return None
    return varlen_attn


def _torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    fn = _torch_varlen_fn()
    if fn is None:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn is not available in this torch")
    cu = layout.cu_seqlens.to(torch.int32)
    # Positional arguments only: (q, k, v, cu_q, cu_k, max_q, max_k) is the shared signature.
    return fn(q, k, v, cu, cu, layout.max_seqlen, layout.max_seqlen)


_flex_compiled: Callable | None = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex_compiled is None:
        # Uncompiled flex_attention materialises the T x T scores; compiled it is a fused kernel.
        # dynamic=True: T changes every step with per-image ratios.
        _flex_compiled = torch.compile(flex_attention, dynamic=True)
    block_mask = layout.cache.get("flex")
    if block_mask is None:
        doc = layout.token_batch

        def same_sequence(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        T = layout.total
        block_mask = create_block_mask(same_sequence, None, None, T, T, device=q.device)
        layout.cache["flex"] = block_mask
    out = _flex_compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                         block_mask=block_mask)
    return out[0].transpose(0, 1)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    import xformers.ops as xops  # only reached after _backend_usable("xformers") succeeded

    bias = layout.cache.get("xformers")
    if bias is None:
        bias = xops.fmha.attn_bias.BlockDiagonalMask.from_seqlens(layout.seqlens.tolist())
        layout.cache["xformers"] = bias
    return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]


_IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "torch_varlen": _torch_varlen,
    "flex": _flex,
    "xformers": _xformers,
    "sdpa_padded": _sdpa_padded,
    "sdpa_per_seq": _sdpa_per_seq,
}

# (backend, device type, dtype) -> "" if it passed the self-check, else why it failed.
_SELF_CHECK: dict[tuple[str, str, torch.dtype], str] = {}
_WARNED_FALLBACK: set[tuple[str, torch.dtype]] = set()


def _self_check_failure(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Run ``backend`` on a tiny random packed input (forward + backward) against the padded SDPA
    path; returns "" if it matches, else the reason (the exception or the mismatch). Cached."""
    key = (backend, device.type, dtype)
    if key in _SELF_CHECK:
        return _SELF_CHECK[key]
    try:
        # The check runs first wherever the first forward pass runs: under autocast (which would turn
        # the float32 reference into bf16), or no_grad / inference_mode (no backward to check). It
        # needs none of them, and its verdict is cached for every later context.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            reason = _run_self_check(backend, device, dtype)
    except Exception as err:  # noqa: BLE001 — any failure means "do not use this backend here"
        first_line = (str(err).strip().splitlines() or [""])[0]
        reason = f"{type(err).__name__}: {first_line[:300]}"
    _SELF_CHECK[key] = reason
    return reason


def _self_check(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    return not _self_check_failure(backend, device, dtype)


def _run_self_check(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend == "xformers":
        import xformers.ops  # noqa: F401
    if backend == "torch_varlen" and _torch_varlen_fn() is None:
        return "torch.nn.attention.varlen.varlen_attn is not in this torch"
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 6, 19], dtype=torch.int32, device=device)
    layout = PackedLayout.from_cu_seqlens(cu, 13)
    # Strided views of one (T, 3, H, d) tensor, exactly as the encoder blocks pass them.
    packed = torch.randn(19, 3, 2, 64, generator=gen).to(device, dtype).requires_grad_()
    out = _IMPLS[backend](*packed.unbind(1), layout)
    out.float().square().sum().backward()
    grads = [g.float() for g in packed.grad.unbind(1)]
    ref_in = [t.detach().float().requires_grad_() for t in packed.unbind(1)]
    ref = _sdpa_padded(*ref_in, PackedLayout.from_cu_seqlens(cu, 13))
    ref.square().sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    out_err = (out.float() - ref).abs().max().item()
    if not torch.allclose(out.float(), ref, atol=tol, rtol=tol):
        return f"output differs from padded SDPA by up to {out_err:.3g} (tolerance {tol})"
    for name, g, r in zip("qkv", grads, ref_in):
        if not torch.allclose(g, r.grad, atol=10 * tol, rtol=10 * tol):
            return f"grad of {name} differs from padded SDPA by up to {(g - r.grad).abs().max().item():.3g}"
    return ""


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend ``backend`` means for tensors on ``device`` of ``dtype``.

    An explicitly named backend that cannot run there raises ValueError (naming why); ``auto``
    falls back along the order documented in the module docstring, with a one-time warning when a
    CUDA run ends on padded SDPA (saying why each varlen backend was refused).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    cuda = device.type == "cuda"
    if backend == "auto":
        if cuda:
            if dtype in (torch.float16, torch.bfloat16) and _self_check("torch_varlen", device, dtype):
                return "torch_varlen"
            if _self_check("flex", device, dtype):
                return "flex"
            if (device.type, dtype) not in _WARNED_FALLBACK:
                _WARNED_FALLBACK.add((device.type, dtype))
                varlen = (_self_check_failure("torch_varlen", device, dtype)
                          if dtype in (torch.float16, torch.bfloat16) else "needs float16/bfloat16")
                warnings.warn(f"varlen attention on {device} with {dtype}: torch_varlen refused ({varlen}); "
                              f"flex refused ({_self_check_failure('flex', device, dtype)}); using padded SDPA, "
                              "which computes attention over the padding too", RuntimeWarning, stacklevel=3)
            return "sdpa_padded"
        return CPU_AUTO_BACKEND
    if backend in ("torch_varlen", "flex", "xformers"):
        if not cuda:
            raise ValueError(f"backend {backend!r} needs CUDA tensors, got device {device}")
        if backend == "torch_varlen" and dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"backend 'torch_varlen' needs float16/bfloat16 inputs, got {dtype}")
        reason = _self_check_failure(backend, device, dtype)
        if reason:
            raise ValueError(f"backend {backend!r} is not usable on {device} with {dtype}: {reason}")
    return backend


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    backend: str = "auto",
    layout: PackedLayout | None = None,
) -> torch.Tensor:
    """Softmax attention within each packed sequence, scale ``1/sqrt(d)``, no dropout.

    q, k, v: (T, H, d), one dtype/device; cu_seqlens (B+1,) int32/int64 prefix sums ending at T;
    max_seqlen: the longest sequence (an upper bound is fine). ``layout``: a precomputed
    :class:`PackedLayout` of these ``cu_seqlens`` (saves rebuilding the maps in every layer).
    Returns (T, H, d) in q's dtype. Differentiable in q, k, v.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, floating=True)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same (T, H, d) shape, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if layout is None:
        layout = PackedLayout.from_cu_seqlens(
            cu_seqlens, max_seqlen, validate=q.device.type == "cpu", total=q.shape[0]
        )
    elif layout.total != q.shape[0]:
        raise ValueError(f"q has {q.shape[0]} tokens but the layout holds {layout.total}")
    if layout.cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {layout.cu_seqlens.device} but q is on {q.device}")
    return _IMPLS[resolve_backend(backend, q.device, q.dtype)](q, k, v, layout)


def padded_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor
) -> torch.Tensor:
    """The anchors' padded attention written out: q, k, v (B, H, L, d), key_valid (B, L) bool ->
    (B, H, L, d) = softmax(q kᵀ / sqrt(d) + mask) v with padded keys at -inf (float32 softmax)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    attn = (q.float() @ k.float().transpose(-2, -1)) * scale
    attn = attn.masked_fill(~key_valid[:, None, None, :], float("-inf")).softmax(dim=-1)
    return (attn @ v.float()).to(q.dtype)
