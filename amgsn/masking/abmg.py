"""ABMG — the Attention-Based Mask Generator policy (docs/method.md §4.1) and the random-mask baseline.

Per step, :meth:`MaskingPolicy.select` decides which patches each image keeps:

* ``random`` mode, or any mode during the first ``warmup_epochs`` epochs: MAE's uniform random
  masking (the attention of an untrained encoder is noise);
* ``abmg`` / ``abmg_mrus``: saliency = the teacher's last-block CLS attention on the full image,
  perturbed by ``U(0, sigma)`` noise on min-max-normalised scores (``relative_noise``), and the
  most salient patches are masked. The ratios come from the caller: a fixed ratio for ``abmg``,
  the :class:`~amgsn.masking.mrus.RatioBank` for ``abmg_mrus`` (see :attr:`uses_ratio_bank`).

Teacher: the online model itself under ``no_grad`` (default; switched to eval for the pass so
stochastic depth does not perturb the saliency) or an EMA copy (:class:`EMATeacher`).

``impl="fused"`` takes only the CLS query and the keys of the last block and calls the fused
``abmg_mask_and_gather``; the encoder then runs on packed tokens. ``impl="reference"`` is the
anchors' way: the full attention matrix of the last block, argsort selection
(:func:`amgsn.ops.reference.abmg_mask_and_gather_full`) and the padded encoder.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
from torch import nn

from amgsn.masking.saliency_bank import IDENTITY_VIEW, SaliencyBank, SaliencyRefresh, to_device
from amgsn.models.vit_mae import MAEOutput, MaskedAutoencoderViT
from amgsn.ops import MaskSelection, abmg_mask_and_gather, abmg_select, cls_attention_scores, gather_visible
from amgsn.ops import reference as ref_ops

MODES = ("random", "abmg", "abmg_mrus")
IMPLS = ("fused", "reference")
TEACHERS = ("online", "ema")


class MaskedBatch(NamedTuple):
    """visible (T, D) packed tokens (differentiable in the online model), the selection, which
    encoder path to run ("packed" | "padded"), whether ABMG (not random) chose the mask, and — with a
    saliency bank — what the teacher refreshed this step (for the caller to gather over ranks and
    :meth:`~amgsn.masking.saliency_bank.SaliencyBank.write`)."""

    visible: torch.Tensor
    selection: MaskSelection
    encoder: str
    abmg: bool
    refreshed: SaliencyRefresh | None = None


class EMATeacher(nn.Module):
    """An exponential moving average of a model's parameters (buffers copied), kept in eval mode.

    Pass the unwrapped model (not a DistributedDataParallel / compiled wrapper).

    ``update(model)``: ``p_ema <- decay * p_ema + (1 - decay) * p`` — call after each optimiser step.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must lie in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def train(self, mode: bool = True) -> EMATeacher:
        # The teacher always runs in eval mode, whatever its owner does.
        super().train(mode)
        self.module.eval()
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = list(self.module.parameters())
        src_p = [p.detach() for p in model.parameters()]
        if len(ema_p) != len(src_p):
            raise ValueError("model does not have the EMA teacher's parameters")
        torch._foreach_lerp_(ema_p, src_p, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


class MaskingPolicy:
    """Chooses the visible patches of each image for one pre-training step.

    Args:
        mode: ``random`` | ``abmg`` | ``abmg_mrus``.
        epochs: total pre-training epochs (sets the default warm-up).
        warmup_epochs: epochs of random masking before ABMG starts (default ``floor(0.1 * epochs)``).
        sigma: noise amplitude on min-max-normalised saliency (SBAM's 0.5).
        impl: ``fused`` | ``reference`` (see the module docstring).
        teacher: ``online`` | ``ema``; ``ema_decay`` for the EMA teacher (created on the first
            :meth:`select` or :meth:`update_teacher` from the online model).
    """

    def __init__(
        self,
        mode: str = "abmg_mrus",
        *,
        epochs: int = 100,
        warmup_epochs: int | None = None,
        sigma: float = 0.5,
        impl: str = "fused",
        teacher: str = "online",
        ema_decay: float = 0.999,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if warmup_epochs is None:
            warmup_epochs = int(math.floor(0.1 * epochs))
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if not sigma >= 0.0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1], got {ema_decay}")
        self.mode, self.impl, self.teacher_kind = mode, impl, teacher
        self.epochs, self.warmup_epochs, self.sigma, self.ema_decay = epochs, warmup_epochs, sigma, ema_decay
        self.ema: EMATeacher | None = None

    @property
    def uses_ratio_bank(self) -> bool:
        """True for ``abmg_mrus``: the caller passes per-image ratios from a RatioBank."""
        return self.mode == "abmg_mrus"

    @property
    def encoder_path(self) -> str:
        return "packed" if self.impl == "fused" else "padded"

    def uses_abmg(self, epoch: int) -> bool:
        """Whether the step at (0-based) ``epoch`` masks by saliency (False: random)."""
        return self.mode != "random" and epoch >= self.warmup_epochs

    # ------------------------------------------------------------------ teacher

    def update_teacher(self, model: MaskedAutoencoderViT) -> None:
        """After an optimiser step: advance the EMA teacher (no-op for the online teacher)."""
        if self.teacher_kind != "ema":
            return
        if self.ema is None:
            self._ensure_ema(model)
        else:
            self.ema.update(model)

    def _ensure_ema(self, model: MaskedAutoencoderViT) -> EMATeacher:
        if self.ema is None:
            self.ema = EMATeacher(model, self.ema_decay)
        return self.ema

    def state_dict(self) -> dict:
        """For checkpoints: the EMA teacher's weights (None for the online teacher / before use)."""
        return {"ema": None if self.ema is None else self.ema.module.state_dict()}

    def load_state_dict(self, state: dict, model: MaskedAutoencoderViT) -> None:
        """Restore :meth:`state_dict`; ``model`` is the online model the EMA copy is built from."""
        if state.get("ema") is None:
            self.ema = None
            return
        if self.teacher_kind != "ema":
            raise ValueError("checkpoint holds an EMA teacher but this policy's teacher is 'online'")
        self.ema = EMATeacher(model, self.ema_decay)
        self.ema.module.load_state_dict(state["ema"])

    @torch.no_grad()
    def _teacher_qk(
        self, model: MaskedAutoencoderViT, imgs: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        full_q = self.impl == "reference"
        if self.teacher_kind == "ema":
            # The EMA has its own patch embedding: it sees the image through its own weights.
            q, k, _ = self._ensure_ema(model).module.teacher_qk(imgs, full_q=full_q)
            return q, k
        was_training = model.training
        model.eval()
        try:
            q, k, _ = model.teacher_qk(tokens=tokens.detach(), full_q=full_q)
        finally:
            model.train(was_training)
        return q, k

    @torch.no_grad()
    def teacher_scores(self, model: MaskedAutoencoderViT, imgs: torch.Tensor) -> torch.Tensor:
        """A fresh teacher pass on ``imgs`` (B, C, H, W) -> (B, N) float32 CLS-attention scores."""
        q, k = self._teacher_qk(model, imgs, model.embed_patches(imgs))
        return self._scores(q, k)

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.impl == "fused":
            # In the activations' dtype (bf16 under autocast): the kernel reads the keys as they are and
            # accumulates in fp32 — an fp32 copy of K would double the bytes it reads.
            return cls_attention_scores(q, k)
        return ref_ops.cls_attention_scores_full(q.float(), k.float())

    # ------------------------------------------------------------------ selection

    def select(
        self,
        model: MaskedAutoencoderViT,
        imgs: torch.Tensor,
        ratios: float | torch.Tensor,
        epoch: int,
        *,
        bank: SaliencyBank | None = None,
        indices: torch.Tensor | None = None,
        views: torch.Tensor | None = None,
        wholes: torch.Tensor | None = None,
    ) -> MaskedBatch:
        """Embed ``imgs`` (B, C, H, W) with the online ``model`` and choose the visible tokens.

        ``ratios``: a float, or (B,) per-image ratios. Noise is drawn from the global RNG on the
        images' device (so a fixed seed fixes the masks). Returns :class:`MaskedBatch`.

        With a saliency ``bank`` whose refresh fraction P is below 1 (docs/method.md §4.4), pass the
        batch's dataset ``indices`` (B,), ``views`` (B, 5) and, preferably, the ``wholes`` (B, C, H, W):
        each image whole, resized (:class:`~amgsn.data.transforms.ViewRecordingTransform`). The teacher
        then runs on the ``bank.plan(indices)`` images only — on their whole images when given (a map
        of the whole image agrees better with the teacher on other views than a map of one crop:
        RESULTS.md, issue 19), else on their views —, every view's scores are read out of the bank (the
        refreshed ones out of their maps as refreshed now), and ``MaskedBatch.refreshed`` carries the
        fresh scores for the caller to write. P = 1 (or no bank) is the exact ABMG of §4.1.
        """
        tokens = model.embed_patches(imgs)  # (B, N, D), with grad: the online model's input
        B, N, _ = tokens.shape
        if bank is not None and bank.refresh < 1.0 and self.uses_abmg(epoch):
            if indices is None or views is None:
                raise ValueError("select with a saliency bank needs the batch's indices and views")
            return self._select_with_bank(model, imgs, tokens, ratios, bank, indices, views, wholes)
        if not self.uses_abmg(epoch):
            noise = torch.rand(B, N, device=tokens.device)
            zeros = torch.zeros(B, N, device=tokens.device)
            if self.impl == "fused":
                sel = abmg_select(zeros, ratios, noise)
                visible = gather_visible(tokens, sel.ids_keep, sel.cu_seqlens, sel.max_seqlen)
            else:
                sel = ref_ops.abmg_select(zeros, ratios, noise)
                visible = ref_ops.gather_visible(tokens, sel.ids_keep, sel.cu_seqlens)
            return MaskedBatch(visible, sel, self.encoder_path, False)

        q, k = self._teacher_qk(model, imgs, tokens)
        noise = torch.rand(B, N, device=tokens.device) * self.sigma
        if self.impl == "fused":
            visible, sel = abmg_mask_and_gather(q, k, tokens, ratios, noise, relative_noise=True)
        else:
            visible, sel = ref_ops.abmg_mask_and_gather_full(q, k, tokens, ratios, noise, relative_noise=True)
        return MaskedBatch(visible, sel, self.encoder_path, True)

    def _select_with_bank(self, model: MaskedAutoencoderViT, imgs: torch.Tensor, tokens: torch.Tensor,
                          ratios: float | torch.Tensor, bank: SaliencyBank, indices: torch.Tensor,
                          views: torch.Tensor, wholes: torch.Tensor | None) -> MaskedBatch:
        B, N, _ = tokens.shape
        pos = bank.plan(indices)  # host-side: the refresh steps live on the CPU
        pos_dev = to_device(pos, tokens.device)
        views = views.to(tokens.device, non_blocking=True)
        batch_idx = torch.as_tensor(indices).reshape(-1).cpu()
        if wholes is not None:  # the teacher sees the refreshed images whole: the identity view
            sub = wholes.to(tokens.device, non_blocking=True).index_select(0, pos_dev).to(imgs.dtype)
            with torch.no_grad():
                q, k = self._teacher_qk(model, sub, model.embed_patches(sub))
            fresh = self._scores(q, k)  # (k, N) on the whole image's patch grid
            src = fresh.new_tensor([IDENTITY_VIEW]).expand(len(pos), 5)
            scores = bank.read(indices, views).to(tokens.device)
            now = bank.preview(batch_idx[pos], fresh, src, views.index_select(0, pos_dev))
            scores = scores.index_copy(0, pos_dev, now)
        else:  # the teacher sees the refreshed views themselves, and this step uses its scores as they are
            sub_imgs = imgs.index_select(0, pos_dev) if self.teacher_kind == "ema" else imgs  # online: tokens
            q, k = self._teacher_qk(model, sub_imgs, tokens.detach().index_select(0, pos_dev))
            fresh = self._scores(q, k)  # (k, N)
            src = views.index_select(0, pos_dev)
            scores = bank.read(indices, views).to(tokens.device).index_copy(0, pos_dev, fresh)
        noise = torch.rand(B, N, device=tokens.device) * self.sigma
        if self.impl == "fused":
            sel = abmg_select(scores, ratios, noise, relative_noise=True)
            visible = gather_visible(tokens, sel.ids_keep, sel.cu_seqlens, sel.max_seqlen)
        else:
            sel = ref_ops.abmg_select(scores, ratios, noise, relative_noise=True)
            visible = ref_ops.gather_visible(tokens, sel.ids_keep, sel.cu_seqlens)
        refreshed = SaliencyRefresh(batch_idx[pos], fresh, src)
        return MaskedBatch(visible, sel, self.encoder_path, True, refreshed)

    def __call__(
        self, model: MaskedAutoencoderViT, imgs: torch.Tensor, ratios: float | torch.Tensor, epoch: int
    ) -> MAEOutput:
        """:meth:`select` then the model's masked reconstruction: -> :class:`MAEOutput`."""
        batch = self.select(model, imgs, ratios, epoch)
        return model(imgs, masked=(batch.visible, batch.selection), encoder=batch.encoder)

