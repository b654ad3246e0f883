"""Masked autoencoder with a ViT encoder that runs on packed variable-length visible tokens.

Structure and initialisation follow facebookresearch/mae ``models_mae.py``; the differences:

* every image may keep a different number of patches (per-image mask ratios, MRUS), so the
  encoder works on the packed (T, D) visible tokens + ``cu_seqlens`` produced by the masking ops,
  with a CLS token prepended per image, and variable-length attention (:mod:`.attention`);
* the selection (which patches are visible) is made outside the model (random, or ABMG from the
  teacher's last-block attention, see :mod:`amgsn.masking`) and passed in; :meth:`teacher_qk`
  computes what ABMG needs — only the last block's CLS query and keys;
* the loss is also returned per image (MRUS updates each image's ratio from its own loss);
* encoder parameter names are timm's ``VisionTransformer`` names (:meth:`encoder_state_dict`);
* the blocks, the decoder's entry and the loss run through ``self.regions`` (:mod:`.regions`):
  eagerly by default, compiled under ``--compile`` (docs/method.md §9.3).

Shapes: B images, C channels, p patch size, N = (img_size / p)² patches, D encoder width,
H heads, d = D / H, T = Σ visible patches, Dd decoder width.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from timm.layers import LayerNorm, PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from amgsn.models.attention import BACKENDS, PackedLayout, varlen_attention
from amgsn.models.blocks import _check_no_attn_dropout, block_forward_padded, drop_path_scale
from amgsn.models.pos_embed import sincos_2d
from amgsn.models.pretrained import InitWeights, LoadReport, load_init, read_init, resolve_size
from amgsn.models.regions import EAGER, Regions, patch_losses, patchify
from amgsn.models.sizes import get_size, timm_vit_spec
from amgsn.ops import MaskSelection, abmg_select, gather_visible
from amgsn.ops._checks import check_tensor

ENCODER_PATHS = ("packed", "padded")


class MAEOutput(NamedTuple):
    """loss: scalar, mean norm-pix MSE over all masked patches of the batch (as MAE);
    per_image_loss: (B,) mean over each image's masked patches (float32, differentiable);
    pred: (B, N, p*p*C) reconstruction; selection: the :class:`MaskSelection` used."""

    loss: torch.Tensor
    per_image_loss: torch.Tensor
    pred: torch.Tensor
    selection: MaskSelection


def _cls_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the CLS tokens and the visible tokens go once a CLS is prepended to every image.

    cu_seqlens (B+1,) of the visible tokens, total = T -> (cu_seqlens + arange(B+1) as int32,
    cls_pos (B,) int64, vis_pos (T,) int64) — row indices into the (T+B, D) packed tensor.
    """
    B = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    steps = torch.arange(B + 1, device=cu.device)
    cu_cls = cu + steps
    seqlens = cu[1:] - cu[:-1]
    token_batch = torch.repeat_interleave(steps[:-1], seqlens, output_size=total)
    vis_pos = torch.arange(total, device=cu.device) + token_batch + 1
    return cu_cls.to(torch.int32), cu_cls[:-1], vis_pos


class MaskedAutoencoderViT(nn.Module):
    """MAE with a timm-compatible ViT encoder and a lightweight ViT decoder.

    Args:
        model: encoder size, ``vit_tiny`` (D=192, 12 blocks, 3 heads), ``vit_small`` (384, 12, 6)
            or ``vit_base`` (768, 12, 12).
        img_size, patch_size: square images; ``img_size`` must be a multiple of ``patch_size``.
        in_chans: image channels.
        depth: encoder depth override (default: the size's 12), for small test models.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder width / blocks / heads;
            defaults per size: ``vit_tiny`` 128 / 4 / 4, ``vit_small`` 256 / 4 / 8,
            ``vit_base`` 512 / 8 / 16 (MAE's decoder).
        mlp_ratio: MLP hidden width / width, encoder and decoder.
        norm_pix_loss: normalise each target patch by its own mean and variance (MAE's default
            for its best results).
        drop_path_rate: stochastic depth of the encoder (linearly increasing per block).
        attn_backend: variable-length attention backend of the packed encoder (see
            :mod:`amgsn.models.attention`).
    """

    def __init__(
        self,
        model: str = "vit_base",
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        depth: int | None = None,
        decoder_embed_dim: int | None = None,
        decoder_depth: int | None = None,
        decoder_num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        drop_path_rate: float = 0.0,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
        size = get_size(model)
        for name, value in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if img_size % patch_size != 0:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        if attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {attn_backend!r}")
        depth = size.depth if depth is None else depth
        dec_dim = decoder_embed_dim or size.decoder_embed_dim
        dec_depth = size.decoder_depth if decoder_depth is None else decoder_depth
        dec_heads = decoder_num_heads or size.decoder_num_heads
        if depth < 1 or dec_depth < 1:
            raise ValueError(f"depth and decoder_depth must be >= 1, got {depth} and {dec_depth}")
        if dec_dim % dec_heads != 0 or dec_dim % 4 != 0:
            raise ValueError(f"decoder_embed_dim ({dec_dim}) must be divisible by 4 and by "
                             f"decoder_num_heads ({dec_heads})")
        self.config = {
            "model": model, "img_size": img_size, "patch_size": patch_size, "in_chans": in_chans,
            "depth": depth, "decoder_embed_dim": dec_dim, "decoder_depth": dec_depth,
            "decoder_num_heads": dec_heads, "mlp_ratio": mlp_ratio, "norm_pix_loss": norm_pix_loss,
            "drop_path_rate": drop_path_rate,
        }
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid = img_size // patch_size
        self.num_patches = self.grid**2
        self.embed_dim = D = size.embed_dim
        self.num_heads = size.num_heads
        self.norm_pix_loss = norm_pix_loss
        self.attn_backend = attn_backend
        # How the blocks, the decoder's entry and the loss run (eager; amgsn.engine.compile swaps in compiled
        # ones). Not a module: the state dict is the same either way.
        self.regions: Regions = EAGER

        # ---- encoder (timm VisionTransformer names) ----
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # Fixed sin-cos tables: buffers, so no optimiser ever sees them (MAE: requires_grad=False).
        self.register_buffer("pos_embed", sincos_2d(D, self.grid, cls_token=True)[None])
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(D, size.num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, drop_path=dpr[i])
            for i in range(depth)
        )
        self.norm = LayerNorm(D)

        # ---- decoder ----
        self.decoder_embed = nn.Linear(D, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(dec_dim, self.grid, cls_token=True)[None])
        self.decoder_blocks = nn.ModuleList(
            Block(dec_dim, dec_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(dec_depth)
        )
        self.decoder_norm = LayerNorm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, patch_size**2 * in_chans)
        self._init_weights()

    # ------------------------------------------------------------------ init / export

    def _init_weights(self) -> None:
        # As MAE: patch projection like a Linear (xavier on the flattened kernel), tokens N(0, .02),
        # Linear xavier-uniform with zero bias, LayerNorm (1, 0).
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def describe(self) -> str:
        """``vit_tiny MAE (64 px, 8-px patches, 6 + 2 blocks)``: the target in load summaries."""
        c = self.config
        return (f"{c['model']} MAE ({c['img_size']} px, {c['patch_size']}-px patches, "
                f"{c['depth']} + {c['decoder_depth']} blocks)")

    def load_init(self, init: InitWeights) -> LoadReport:
        """Load pre-trained weights (see :func:`amgsn.models.pretrained.read_init`) into this MAE.

        The encoder loads (patch embedding resampled to this patch size where it differs); the
        decoder loads when the weights hold one (an MAE checkpoint with decoder, an ``amgsn
        pretrain`` checkpoint), else it keeps its initialisation; the position tables stay the fixed
        sin-cos of this grid. The report (also ``self.init_report``) lists what happened. ValueError
        when the width differs."""
        resolve_size(init, {"model": self.config["model"]})
        self.init_report = load_init(self, init, target=self.describe(),
                                     fixed_sincos=("pos_embed", "decoder_pos_embed"))
        return self.init_report

    @classmethod
    def from_init(
        cls, spec: str | os.PathLike | Mapping[str, Any] | InitWeights, **kwargs: Any
    ) -> MaskedAutoencoderViT:
        """An MAE initialised from ``spec`` (anything :func:`~amgsn.models.pretrained.read_init` reads).

        ``model`` / ``img_size`` / ``patch_size`` / ``depth`` / ``in_chans`` and the decoder's
        ``decoder_embed_dim`` / ``decoder_depth`` / ``decoder_num_heads`` in ``kwargs`` that are None or
        absent come from the weights (the decoder's from the size's defaults when the weights have
        none); given, the weights are fitted to them. Other ``kwargs``: constructor arguments."""
        init = spec if isinstance(spec, InitWeights) else read_init(spec)
        keys = ("model", "img_size", "patch_size", "depth", "in_chans", "decoder_embed_dim", "decoder_depth",
                "decoder_num_heads")
        size = resolve_size(init, {k: kwargs.pop(k, None) for k in keys})
        model = cls(size.pop("model"), **{k: size.get(k) for k in keys[1:]}, **kwargs)
        model.load_init(init)
        return model

    def timm_spec(self) -> tuple[str, dict[str, int]]:
        """(timm model name, kwargs) of the matching timm ``VisionTransformer`` encoder."""
        c = self.config
        return timm_vit_spec(c["model"], c["img_size"], c["patch_size"], c["depth"])

    def encoder_state_dict(self, global_pool: str = "token") -> dict[str, torch.Tensor]:
        """The encoder's weights under timm ``VisionTransformer`` names (detached clones).

        Keys: ``cls_token`` (1,1,D), ``pos_embed`` (1,1+N,D) (our fixed table; a learned
        parameter in timm), ``patch_embed.proj.*``, ``blocks.*``, and the final norm as ``norm.*``
        — or as ``fc_norm.*`` for ``global_pool`` in ('avg', 'avgmax', 'max'), where timm moves
        the final norm after the pooling. (MAE's fine-tuning re-initialises that norm instead;
        we carry the pre-trained affine over, which starts it at the encoder's output scale.)
        Loads with ``strict=True`` into ``timm.create_model(*self.timm_spec(), num_classes=0,
        global_pool=global_pool)``.
        """
        if global_pool not in ("", "token", "avg", "avgmax", "max"):
            raise ValueError(
                f"global_pool must be '', 'token', 'avg', 'avgmax' or 'max', got {global_pool!r}"
            )
        norm_name = "fc_norm" if global_pool in ("avg", "avgmax", "max") else "norm"
        out: dict[str, torch.Tensor] = {}
        for key, value in self.state_dict().items():
            head = key.split(".", 1)[0]
            if head in ("cls_token", "pos_embed", "patch_embed", "blocks"):
                out[key] = value.detach().clone()
            elif head == "norm":
                out[norm_name + key[len("norm"):]] = value.detach().clone()
        return out

    # ------------------------------------------------------------------ patches

    def _check_imgs(self, imgs: object) -> torch.Tensor:
        check_tensor("imgs", imgs, ndim=4, floating=True)
        expected = (self.in_chans, self.grid * self.patch_size, self.grid * self.patch_size)
        if tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"imgs must be (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {tuple(imgs.shape)}")
        return imgs

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), patches row-major, each patch (p, p, C) flattened (MAE)."""
        return patchify(self._check_imgs(imgs), self.patch_size, self.in_chans)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W); inverse of :meth:`patchify`."""
        check_tensor("x", x, ndim=3)
        B, C, p, g = x.shape[0], self.in_chans, self.patch_size, self.grid
        if x.shape[1:] != (g * g, p * p * C):
            raise ValueError(f"x must be (B, {g * g}, {p * p * C}), got {tuple(x.shape)}")
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(B, g, g, p, p, C))
        return x.reshape(B, C, g * p, g * p)

    # ------------------------------------------------------------------ encoder

    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """Patch embedding + position: (B, C, H, W) -> (B, N, D) tokens (no CLS)."""
        return self.patch_embed(self._check_imgs(imgs)) + self.pos_embed[:, 1:]

    def _cls_with_pos(self) -> torch.Tensor:
        return (self.cls_token + self.pos_embed[:, :1]).reshape(-1)  # (D,)

    def random_masking(
        self, tokens: torch.Tensor, mask_ratio: float | torch.Tensor
    ) -> tuple[torch.Tensor, MaskSelection]:
        """MAE's random masking (uniform among patches, exact per-image counts), packed.

        tokens (B, N, D); mask_ratio a float or (B,) tensor -> (visible (T, D), selection).
        Draws its noise from the global RNG on the tokens' device.
        """
        B, N, _ = tokens.shape
        noise = torch.rand(B, N, device=tokens.device)
        sel = abmg_select(torch.zeros(B, N, device=tokens.device), mask_ratio, noise)
        return gather_visible(tokens, sel.ids_keep, sel.cu_seqlens, sel.max_seqlen), sel

    def _dense_trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLS + tokens through every block but the last: (B, N, D) -> (B, 1+N, D)."""
        B = tokens.shape[0]
        x = torch.cat([self._cls_with_pos().expand(B, 1, -1), tokens], dim=1)
        for blk in self.blocks[:-1]:
            x = self.regions.run("teacher.block", blk, x)
        return x

    def teacher_qk(
        self, imgs: torch.Tensor | None = None, *, tokens: torch.Tensor | None = None, full_q: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What ABMG needs from this encoder run on the full image (docs/method.md §4.1).

        Pass ``imgs`` (B, C, H, W), or ``tokens`` (B, N, D) from :meth:`embed_patches`. Runs
        ``blocks[:-1]`` densely, then only the last block's ``norm1`` and the query/key part of its
        ``qkv`` — no attention output, no MLP. Returns ``(q, k, tokens)``: ``q`` the CLS query
        (B, H, d) — or with ``full_q`` every query (B, H, 1+N, d), as the anchors' full attention
        matrix needs —, ``k`` (B, H, 1+N, d), and the (B, N, D) patch tokens (with position).
        Call under ``torch.no_grad()`` for a teacher.
        """
        if tokens is None:
            if imgs is None:
                raise ValueError("teacher_qk needs imgs or tokens")
            tokens = self.embed_patches(imgs)
        x = self._dense_trunk(tokens)
        last = self.blocks[-1]
        attn = last.attn
        B, L, D = x.shape
        h = last.norm1(x)
        w, b = attn.qkv.weight, attn.qkv.bias
        dim = attn.num_heads * attn.head_dim
        b_q, b_k = (None, None) if b is None else (b[:dim], b[dim : 2 * dim])
        k = nn.functional.linear(h, w[dim : 2 * dim], b_k)
        k = attn.k_norm(k.reshape(B, L, attn.num_heads, attn.head_dim).transpose(1, 2))
        # Only the CLS row of the query is needed for the saliency (skip N of 1+N query rows and V).
        q_in = h if full_q else h[:, :1]
        q = nn.functional.linear(q_in, w[:dim], b_q).reshape(B, -1, attn.num_heads, attn.head_dim)
        q = attn.q_norm(q.transpose(1, 2))
        return (q if full_q else q[:, :, 0]), k, tokens

    def _prepend_cls(
        self, visible: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, D) visible -> ((T+B, D) with a CLS row before each image, cu_seqlens with CLS)."""
        T, D = visible.shape
        B = cu_seqlens.numel() - 1
        cu_cls, cls_pos, vis_pos = _cls_positions(cu_seqlens, T)
        x = visible.new_zeros(T + B, D).index_copy(0, vis_pos, visible)
        x = x.index_copy(0, cls_pos, self._cls_with_pos().to(visible.dtype).expand(B, D))
        return x, cu_cls

    def _check_packed(self, visible: object, cu_seqlens: object) -> None:
        check_tensor("visible", visible, ndim=2, floating=True)
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
        if visible.shape[1] != self.embed_dim:
            raise ValueError(f"visible must be (T, {self.embed_dim}), got {tuple(visible.shape)}")

    def forward_encoder_packed(
        self, visible: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        """Encoder on packed tokens: visible (T, D) + cu_seqlens (B+1,) -> latent (T+B, D).

        A CLS token is prepended to each image (row ``cu_seqlens[b] + b`` of the output, followed
        by that image's visible tokens in order); every block runs token-wise layers on the 2-D
        tensor and variable-length attention within each image; then the final norm.

        When ``self.regions`` asks for more rows than T+B (``--compile-shapes bucket``), zero rows are
        appended as extra sequences of at most ``max_seqlen + 1`` rows each: attention keeps them to
        themselves, and they are cut off before the final norm, so nothing downstream sees them.
        """
        self._check_packed(visible, cu_seqlens)
        x, cu_cls = self._prepend_cls(visible, cu_seqlens)
        if x.device.type == "cpu" and int(cu_seqlens[-1]) != visible.shape[0]:
            raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but visible has {visible.shape[0]} rows")
        rows, seq = x.shape[0], int(max_seqlen) + 1
        padded = self.regions.padded_rows(rows)
        pad_sequences = 0
        if padded > rows:
            pad_sequences = -(-(padded - rows) // seq)
            ends = torch.arange(1, pad_sequences + 1, device=cu_cls.device, dtype=cu_cls.dtype) * seq + rows
            cu_cls = torch.cat([cu_cls, ends.clamp_max(padded)])
            x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])
        # T + B is known from the shapes: no device sync to read cu_seqlens[-1] on CUDA.
        layout = PackedLayout.from_cu_seqlens(cu_cls, seq, validate=x.device.type == "cpu", total=x.shape[0])
        layout.pad_sequences = pad_sequences
        for blk in self.blocks:
            x = self._packed_block(blk, x, layout)
        return self.norm(x[:rows] if padded > rows else x)

    def _packed_block(self, blk: Block, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """:func:`~amgsn.models.blocks.block_forward_packed` with the halves run by ``self.regions``."""
        _check_no_attn_dropout(blk)
        q, k, v, h = self.regions.run("encoder.attn_in", blk, x)
        o = varlen_attention(q, k, v, layout.cu_seqlens, layout.max_seqlen, backend=self.attn_backend,
                             layout=layout)
        scale1 = drop_path_scale(blk.drop_path1, layout, o)
        scale2 = drop_path_scale(blk.drop_path2, layout, o)
        return self.regions.run("encoder.attn_out", blk, x, o, h, scale1, scale2)

    def forward_encoder_padded(
        self, visible: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        """The reference encoder (``--impl reference``): same inputs/outputs as
        :meth:`forward_encoder_packed`, computed the anchors' way — visible tokens padded to
        (B, 1 + max_seqlen, D) with CLS first, every block on the padded batch with a key-padding
        attention mask, then the real rows are packed again."""
        self._check_packed(visible, cu_seqlens)
        if visible.device.type == "cpu" and int(cu_seqlens[-1]) != visible.shape[0]:
            raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but visible has {visible.shape[0]} rows")
        vis = PackedLayout.from_cu_seqlens(
            cu_seqlens, int(max_seqlen), validate=visible.device.type == "cpu", total=visible.shape[0]
        )
        B = vis.batch_size
        x = torch.cat([self._cls_with_pos().to(visible.dtype).expand(B, 1, -1), vis.pad(visible)], dim=1)
        key_valid = torch.cat([vis.valid.new_ones(B, 1), vis.valid], dim=1)
        for blk in self.blocks:
            x = block_forward_padded(blk, x, key_valid)
        x = self.norm(x)
        _, cls_pos, vis_pos = _cls_positions(cu_seqlens, vis.total)
        out = x.new_zeros(vis.total + B, x.shape[-1]).index_copy(0, vis_pos, vis.unpad(x[:, 1:]))
        return out.index_copy(0, cls_pos, x[:, 0])

    # ------------------------------------------------------------------ decoder / loss

    def forward_decoder(self, latent: torch.Tensor, sel: MaskSelection) -> torch.Tensor:
        """latent (T+B, D) packed with CLS (from the encoder) -> pred (B, N, p*p*C).

        Visible latents are scattered back to their patch positions, the ``mask_token`` fills the
        masked ones, then decoder position embedding, dense decoder blocks, norm and prediction.
        """
        return self.decoder_pred(self.decoder_norm(self._decoder_trunk(latent, sel)))[:, 1:]

    def _decoder_trunk(self, latent: torch.Tensor, sel: MaskSelection) -> torch.Tensor:
        """latent (T+B, D) -> (B, 1+N, Dd) after the decoder blocks (before its norm and head)."""
        T = sel.ids_keep.shape[0]
        B = sel.cu_seqlens.numel() - 1
        if latent.shape[0] != T + B:
            raise ValueError(f"latent must have T + B = {T + B} rows (selection), got {latent.shape[0]}")
        _, cls_pos, vis_pos = _cls_positions(sel.cu_seqlens, T)
        x = self.regions.run("decoder.embed", self.decoder_embed, self.mask_token, self.decoder_pos_embed, latent,
                             vis_pos, cls_pos, sel.ids_keep, sel.cu_seqlens, self.num_patches)
        for blk in self.decoder_blocks:
            x = self.regions.run("decoder.block", blk, x)
        return x

    def _patch_losses(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """(B, N) mean squared error per patch, in float32, against (normalised) target pixels."""
        return patch_losses(self._check_imgs(imgs), pred, self.patch_size, self.in_chans, self.norm_pix_loss)

    def per_image_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) mean norm-pix MSE over each image's masked patches (``mask`` (B, N) bool, True =
        masked); 0 for an image without masked patches."""
        per_patch = self._patch_losses(imgs, pred)
        m = mask.to(per_patch.dtype)
        return (per_patch * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | torch.Tensor = 0.75,
        *,
        masked: tuple[torch.Tensor, MaskSelection] | None = None,
        encoder: str = "packed",
    ) -> MAEOutput:
        """Masked reconstruction of ``imgs`` (B, C, H, W).

        ``masked``: ``(visible (T, D), selection)`` chosen outside (e.g. by the ABMG policy,
        ``visible`` gathered from :meth:`embed_patches` of these images); without it, MAE's random
        masking at ``mask_ratio`` (float or (B,) tensor). ``encoder``: ``"packed"`` (varlen) or
        ``"padded"`` (the reference). Returns :class:`MAEOutput`.
        """
        if encoder not in ENCODER_PATHS:
            raise ValueError(f"encoder must be one of {ENCODER_PATHS}, got {encoder!r}")
        self._check_imgs(imgs)
        if masked is None:
            visible, sel = self.random_masking(self.embed_patches(imgs), mask_ratio)
        else:
            visible, sel = masked
            if sel.mask.shape != (imgs.shape[0], self.num_patches):
                raise ValueError(f"masked selection is for {tuple(sel.mask.shape)} patches, imgs need "
                                 f"({imgs.shape[0]}, {self.num_patches})")
        run = self.forward_encoder_packed if encoder == "packed" else self.forward_encoder_padded
        latent = run(visible, sel.cu_seqlens, sel.max_seqlen)
        x = self._decoder_trunk(latent, sel)
        loss, per_image, pred = self.regions.run("decoder.loss", self.decoder_norm, self.decoder_pred, x, imgs,
                                                 sel.mask, self.patch_size, self.in_chans, self.norm_pix_loss)
        return MAEOutput(loss, per_image, pred, sel)
