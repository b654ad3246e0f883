"""Models: varlen attention, the packed MAE encoder vs its padded reference and timm, the decoder,
the per-image loss, and the ViT classifier's timm interop / checkpoint loading."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from amgsn.models import MaskedAutoencoderViT, ViTClassifier, sincos_2d, varlen_attention
from amgsn.ops import reference as ref_ops

IMG, PATCH, DEPTH = 32, 8, 2  # N = 16 patches: tiny, so every test runs in well under a second
N = (IMG // PATCH) ** 2


def tiny_mae(**kw) -> MaskedAutoencoderViT:
    kw = {"img_size": IMG, "patch_size": PATCH, "depth": DEPTH, "decoder_depth": 1, **kw}
    return MaskedAutoencoderViT("vit_tiny", **kw)


def random_lengths_cu(B: int, max_len: int, gen: torch.Generator) -> torch.Tensor:
    lens = torch.randint(1, max_len + 1, (B,), generator=gen)
    lens[0] = 1  # edge case: a one-token sequence
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    return cu


# ------------------------------------------------------------------------------- pos embed


def mae_2d_sincos_numpy(embed_dim: int, grid_size: int) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py, transcribed (cls_token=True)."""

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=float) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


@pytest.mark.parametrize("dim,grid", [(192, 4), (64, 7), (128, 14)])
def test_sincos_matches_mae(dim, grid):
    ours = sincos_2d(dim, grid, cls_token=True)
    assert ours.dtype == torch.float32 and ours.shape == (1 + grid * grid, dim)
    np.testing.assert_allclose(ours.numpy(), mae_2d_sincos_numpy(dim, grid), atol=1e-6)
    with pytest.raises(ValueError, match="embed_dim"):
        sincos_2d(30, 4)


# ------------------------------------------------------------------------------- attention


def per_sequence_attention(q, k, v, cu):
    """Independent reference: explicit softmax attention, one sequence at a time, float64."""
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[s:e].double().transpose(0, 1) for t in (q, k, v))  # (H, n, d)
        a = (qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        outs.append((a @ vs).transpose(0, 1))
    return torch.cat(outs).to(q.dtype)


@pytest.mark.parametrize("backend", ["auto", "sdpa_padded", "sdpa_per_seq"])
def test_varlen_attention_matches_per_sequence(seed, backend):
    gen = torch.Generator().manual_seed(seed)
    B, H, d = 6, 3, 24
    cu = random_lengths_cu(B, 23, gen)
    T = int(cu[-1])
    q, k, v = (torch.randn(T, H, d, generator=gen, requires_grad=True) for _ in range(3))
    max_len = int((cu[1:] - cu[:-1]).max())
    out = varlen_attention(q, k, v, cu, max_len + 2, backend=backend)  # an upper bound is fine
    go = torch.randn(T, H, d, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), go)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = per_sequence_attention(qr, kr, vr, cu)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), go)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_varlen_attention_bad_input():
    q = torch.randn(7, 2, 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        varlen_attention(q[None], q[None], q[None], cu, 4)
    with pytest.raises(ValueError, match="same"):
        varlen_attention(q, q[:6], q, cu, 4)
    with pytest.raises(ValueError, match="cu_seqlens ends at 6, expected 7"):
        varlen_attention(q, q, q, torch.tensor([0, 3, 6], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="start at 0"):
        varlen_attention(q, q, q, torch.tensor([1, 3, 7], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="max_seqlen"):
        varlen_attention(q, q, q, cu, 3)
    with pytest.raises(TypeError, match="cu_seqlens"):
        varlen_attention(q, q, q, cu.float(), 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        varlen_attention(q, q, q, cu, 4, backend="magic")
    with pytest.raises(ValueError, match="needs CUDA"):
        varlen_attention(q, q, q, cu, 4, backend="torch_varlen")


def test_backend_self_check_rejects_broken_backends(monkeypatch):
    from amgsn.models import attention

    monkeypatch.setattr(attention, "_SELF_CHECK", {})
    cpu = torch.device("cpu")
    assert attention._self_check("sdpa_per_seq", cpu, torch.float32)
    assert not attention._self_check("torch_varlen", cpu, torch.float32)  # Flash kernels: CUDA only
    # A backend that runs but computes the wrong thing (ignores the sequence boundaries) is refused.
    monkeypatch.setitem(attention._IMPLS, "flex", lambda q, k, v, layout: v)
    assert not attention._self_check("flex", cpu, torch.float32)
    monkeypatch.setattr(attention, "_SELF_CHECK", {})
    monkeypatch.setitem(attention._IMPLS, "flex", attention._sdpa_per_seq)  # a correct one passes
    assert attention._self_check("flex", cpu, torch.float32)
    assert attention.resolve_backend("auto", cpu, torch.float32) == attention.CPU_AUTO_BACKEND


@pytest.mark.parametrize("context", ["autocast", "no_grad", "inference_mode"])
def test_backend_self_check_ignores_the_callers_context(monkeypatch, context):
    # The check runs where the first forward pass runs: inside the training step's autocast (it used
    # to hit a dtype mismatch there and refuse every varlen backend on the GPU), or under no_grad /
    # inference_mode (evaluation, predict: no backward to check). Its cached verdict must not depend on it.
    from amgsn.models import attention

    monkeypatch.setattr(attention, "_SELF_CHECK", {})
    ctx = {"autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16), "no_grad": torch.no_grad,
           "inference_mode": torch.inference_mode}[context]
    with ctx():
        assert attention._self_check_failure("sdpa_per_seq", torch.device("cpu"), torch.float32) == ""


def test_backend_refusal_says_why(monkeypatch):
    from amgsn.models import attention

    monkeypatch.setattr(attention, "_SELF_CHECK", {})
    monkeypatch.setattr(attention, "_WARNED_FALLBACK", set())
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setitem(attention._IMPLS, "flex", lambda q, k, v, layout: v)
    assert "output differs from padded SDPA" in attention._self_check_failure("flex", cpu, torch.float32)
    # Cached refusals stand in for a GPU: nothing below touches CUDA.
    monkeypatch.setitem(attention._SELF_CHECK, ("torch_varlen", "cuda", torch.bfloat16), "RuntimeError: no kernel")
    monkeypatch.setitem(attention._SELF_CHECK, ("flex", "cuda", torch.bfloat16), "grad of q differs")
    with pytest.raises(ValueError, match="torch_varlen.*not usable on cuda.*no kernel"):
        attention.resolve_backend("torch_varlen", cuda, torch.bfloat16)
    with pytest.warns(RuntimeWarning, match=r"torch_varlen refused \(RuntimeError: no kernel\).*grad of q differs"):
        assert attention.resolve_backend("auto", cuda, torch.bfloat16) == "sdpa_padded"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per (device, dtype)
        assert attention.resolve_backend("auto", cuda, torch.bfloat16) == "sdpa_padded"


# ------------------------------------------------------------------------------- MAE encoder


def per_image_ratios(B: int, gen: torch.Generator) -> torch.Tensor:
    r = torch.rand(B, generator=gen) * 0.9
    r[0], r[-1] = 0.0, 0.97  # every patch kept / a single patch kept
    return r


@pytest.mark.parametrize("backend", ["sdpa_padded", "sdpa_per_seq"])
def test_packed_encoder_matches_padded_reference(seed, backend):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae(attn_backend=backend)
    B = 5
    imgs = torch.randn(B, 3, IMG, IMG, generator=gen)
    tokens = model.embed_patches(imgs)
    visible, sel = model.random_masking(tokens, per_image_ratios(B, gen))
    packed = model.forward_encoder_packed(visible, sel.cu_seqlens, sel.max_seqlen)
    padded = model.forward_encoder_padded(visible, sel.cu_seqlens, sel.max_seqlen)
    T = visible.shape[0]
    assert packed.shape == padded.shape == (T + B, model.embed_dim)
    cu = sel.cu_seqlens.tolist()
    for b in range(B):  # per image: CLS row then that image's visible tokens
        rows = slice(cu[b] + b, cu[b + 1] + b + 1)
        torch.testing.assert_close(packed[rows], padded[rows], atol=1e-5, rtol=1e-5)
    # The gradients agree too (they reach the tokens through the packed gather).
    go = torch.randn(packed.shape, generator=gen)
    g_packed = torch.autograd.grad(packed, tokens, go, retain_graph=True)[0]
    g_padded = torch.autograd.grad(padded, tokens, go)[0]
    torch.testing.assert_close(g_packed, g_padded, atol=1e-5, rtol=1e-5)


def test_packed_drop_path_is_per_image(seed):
    """Stochastic depth on packed tokens drops whole images, drawing the RNG as timm's DropPath
    does on the padded batch: with the same seed both paths agree."""
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae(drop_path_rate=0.5, attn_backend="sdpa_per_seq").train()
    B = 10  # 2 x 10 keep/drop draws in block 1: two seeds agree with probability 2^-20
    imgs = torch.randn(B, 3, IMG, IMG, generator=gen)
    visible, sel = model.random_masking(model.embed_patches(imgs), per_image_ratios(B, gen))
    torch.manual_seed(seed)
    packed = model.forward_encoder_packed(visible, sel.cu_seqlens, sel.max_seqlen)
    torch.manual_seed(seed)
    padded = model.forward_encoder_padded(visible, sel.cu_seqlens, sel.max_seqlen)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    torch.manual_seed(seed + 1)
    other = model.forward_encoder_packed(visible, sel.cu_seqlens, sel.max_seqlen)
    assert not torch.allclose(packed, other)  # the drop pattern is random (and applied)


def test_encoder_equals_timm_vit_on_full_images(seed):
    """All patches visible: our packed encoder == timm's VisionTransformer with our weights."""
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae().eval()
    name, kwargs = model.timm_spec()
    assert name == "vit_tiny_patch16_224" and kwargs == {"img_size": IMG, "patch_size": PATCH, "depth": DEPTH}
    vit = timm.create_model(name, pretrained=False, num_classes=0, global_pool="token", **kwargs).eval()
    vit.load_state_dict(model.encoder_state_dict("token"), strict=True)
    B = 3
    imgs = torch.randn(B, 3, IMG, IMG, generator=gen)
    visible, sel = model.random_masking(model.embed_patches(imgs), 0.0)
    with torch.no_grad():
        ours = model.forward_encoder_packed(visible, sel.cu_seqlens, sel.max_seqlen)
        theirs = vit.forward_features(imgs)
    torch.testing.assert_close(ours.reshape(B, 1 + N, -1), theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool,norm_key", [("token", "norm"), ("avg", "fc_norm"), ("", "norm")])
def test_encoder_state_dict_loads_strict_into_timm(pool, norm_key):
    model = tiny_mae(img_size=48, patch_size=16)
    sd = model.encoder_state_dict(pool)
    assert f"{norm_key}.weight" in sd and not any(k.startswith(("decoder", "mask_token")) for k in sd)
    name, kwargs = model.timm_spec()
    vit = timm.create_model(name, pretrained=False, num_classes=0, global_pool=pool, **kwargs)
    vit.load_state_dict(sd, strict=True)  # raises on any missing / unexpected key
    torch.testing.assert_close(vit.pos_embed.detach(), model.pos_embed)
    with pytest.raises(ValueError, match="global_pool"):
        model.encoder_state_dict("map")


def test_teacher_qk_is_the_last_blocks_query_and_keys(seed):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae(depth=3).eval()
    B = 2
    imgs = torch.randn(B, 3, IMG, IMG, generator=gen)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **model.timm_spec()[1]).eval()
    vit.load_state_dict(model.encoder_state_dict(), strict=True)
    with torch.no_grad():
        x = vit._pos_embed(vit.patch_embed(imgs))
        for blk in vit.blocks[:-1]:
            x = blk(x)
        last = vit.blocks[-1].attn
        qkv = last.qkv(vit.blocks[-1].norm1(x)).reshape(B, 1 + N, 3, last.num_heads, last.head_dim)
        q_ref, k_ref = qkv.permute(2, 0, 3, 1, 4)[:2]
        q_cls, k, tokens = model.teacher_qk(imgs)
        q_full, k2, _ = model.teacher_qk(imgs, full_q=True)
    assert q_cls.shape == (B, 3, 64) and k.shape == (B, 3, 1 + N, 64) and tokens.shape == (B, N, 192)
    torch.testing.assert_close(q_cls, q_ref[:, :, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q_full, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k2, k_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens, model.embed_patches(imgs))


# ------------------------------------------------------------------------------- decoder / loss


def patchify_loop(imgs: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = imgs.shape
    rows = []
    for i in range(H // p):
        for j in range(W // p):
            rows.append(imgs[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(0, 2, 3, 1).reshape(B, -1))
    return torch.stack(rows, dim=1)


def test_patchify_roundtrip(seed):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae(in_chans=2)
    imgs = torch.randn(3, 2, IMG, IMG, generator=gen)
    patches = model.patchify(imgs)
    torch.testing.assert_close(patches, patchify_loop(imgs, PATCH), atol=0, rtol=0)
    torch.testing.assert_close(model.unpatchify(patches), imgs, atol=0, rtol=0)


def test_decoder_places_latents_and_mask_tokens(seed):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae().eval()
    B, D = 4, model.embed_dim
    _, sel = model.random_masking(torch.zeros(B, N, D), per_image_ratios(B, gen))
    T = sel.ids_keep.numel()
    latent = torch.randn(T + B, D, generator=gen)
    with torch.no_grad():
        pred = model.forward_decoder(latent, sel)
    assert pred.shape == (B, N, PATCH * PATCH * 3)
    # Dense reference, one image at a time: CLS, then mask tokens with the latents at ids_keep.
    cu = sel.cu_seqlens.tolist()
    for b in range(B):
        rows = latent[cu[b] + b:cu[b + 1] + b + 1]
        y = model.decoder_embed(rows)
        full = model.mask_token.reshape(1, -1).repeat(N, 1)
        full[sel.ids_keep[cu[b]:cu[b + 1]]] = y[1:]
        x = torch.cat([y[:1], full])[None] + model.decoder_pos_embed
        with torch.no_grad():
            for blk in model.decoder_blocks:
                x = blk(x)
            expected = model.decoder_pred(model.decoder_norm(x))[0, 1:]
        torch.testing.assert_close(pred[b], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_per_image_loss_matches_a_loop(seed, norm_pix):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae(norm_pix_loss=norm_pix)
    B = 5
    imgs = torch.randn(B, 3, IMG, IMG, generator=gen)
    out = model(imgs, per_image_ratios(B, gen))
    target = patchify_loop(imgs, PATCH)
    total, count = 0.0, 0
    for b in range(B):
        masked = out.selection.mask[b].nonzero()[:, 0].tolist()
        errs = []
        for n in masked:
            t = target[b, n]
            if norm_pix:
                t = (t - t.mean()) / torch.sqrt(t.var(unbiased=True) + 1e-6)
            errs.append(((out.pred[b, n] - t) ** 2).mean())
        expected = torch.stack(errs).mean() if errs else torch.tensor(0.0)
        torch.testing.assert_close(out.per_image_loss[b], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.per_image_loss(imgs, out.pred, out.selection.mask)[b], expected,
                                   atol=1e-5, rtol=1e-5)
        total, count = total + sum(e.item() for e in errs), count + len(errs)
    assert out.selection.mask[0].sum() == 0 and out.per_image_loss[0] == 0  # ratio 0: nothing masked
    torch.testing.assert_close(out.loss.item(), total / count, atol=1e-5, rtol=1e-5)


def test_gradient_reaches_encoder_decoder_and_mask_token(seed):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae()
    imgs = torch.randn(3, 3, IMG, IMG, generator=gen)
    model(imgs, torch.tensor([0.5, 0.75, 0.9])).loss.backward()
    for name in ["patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight",
                 "norm.weight", "decoder_embed.weight", "mask_token", "decoder_blocks.0.attn.proj.weight",
                 "decoder_pred.weight"]:
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # The sin-cos tables are fixed buffers, outside every optimiser.
    assert "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" in model.state_dict() and "decoder_pos_embed" in model.state_dict()


def test_random_masking_keeps_exact_counts(seed):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae()
    B = 6
    ratios = per_image_ratios(B, gen)
    tokens = torch.randn(B, N, model.embed_dim, generator=gen)
    visible, sel = model.random_masking(tokens, ratios)
    keep = ref_ops.num_keep_from_ratio(ratios, B, N)
    assert torch.equal((sel.cu_seqlens[1:] - sel.cu_seqlens[:-1]).long(), keep)
    assert torch.equal((~sel.mask).sum(1), keep)
    torch.testing.assert_close(visible, ref_ops.gather_visible(tokens, sel.ids_keep, sel.cu_seqlens))


def test_mae_bad_input():
    with pytest.raises(ValueError, match="model must be one of"):
        MaskedAutoencoderViT("vit_huge")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        MaskedAutoencoderViT("vit_tiny", img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="attn_backend"):
        tiny_mae(attn_backend="nope")
    model = tiny_mae()
    with pytest.raises(ValueError, match="imgs must be"):
        model(torch.randn(2, 3, 24, 24))
    with pytest.raises(TypeError, match="imgs"):
        model(np.zeros((2, 3, IMG, IMG)))
    with pytest.raises(ValueError, match="encoder must be one of"):
        model(torch.randn(2, 3, IMG, IMG), encoder="dense")
    with pytest.raises(ValueError, match="visible must be"):
        model.forward_encoder_packed(torch.randn(4, 7), torch.tensor([0, 2, 4], dtype=torch.int32), 2)


# ------------------------------------------------------------------------------- classifier


def tiny_classifier(**kw) -> ViTClassifier:
    kw = {"img_size": IMG, "patch_size": PATCH, "depth": DEPTH, "drop_path_rate": 0.0, **kw}
    return ViTClassifier("vit_tiny", 7, **kw)


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_timm_spec_rebuilds_the_same_model(seed, pool):
    gen = torch.Generator().manual_seed(seed)
    clf = tiny_classifier(global_pool=pool).eval()
    name, kwargs = clf.timm_spec()
    assert kwargs["global_pool"] == pool
    vit = timm.create_model(name, pretrained=False, num_classes=7, **kwargs).eval()
    vit.load_state_dict(clf.timm_state_dict(), strict=True)
    x = torch.randn(3, 3, IMG, IMG, generator=gen)
    with torch.no_grad():
        pooled, logits = clf.forward_features_and_logits(x)
        torch.testing.assert_close(logits, vit(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clf(x), logits)
        torch.testing.assert_close(pooled, vit.forward_head(vit.forward_features(x), pre_logits=True))
        z = clf.project(pooled)
    assert pooled.shape == (3, 192) and z.shape == (3, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))


def pretrain_state(mae: MaskedAutoencoderViT, **args) -> dict:
    a = {"model": "vit_tiny", "img_size": mae.config["img_size"], "patch_size": mae.config["patch_size"], **args}
    # Keys as a DDP-wrapped model saves them: the loader strips the prefix.
    return {"kind": "pretrain", "model": {f"module.{k}": v for k, v in mae.state_dict().items()}, "args": a}


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_from_pretrain_checkpoint_loads_the_encoder(seed, pool):
    gen = torch.Generator().manual_seed(seed)
    mae = tiny_mae().eval()
    clf = ViTClassifier.from_pretrain_checkpoint(pretrain_state(mae), num_classes=5, global_pool=pool,
                                                 drop_path_rate=0.0).eval()
    assert (clf.model_name, clf.img_size, clf.patch_size, clf.depth) == ("vit_tiny", IMG, PATCH, DEPTH)
    imgs = torch.randn(2, 3, IMG, IMG, generator=gen)
    visible, sel = mae.random_masking(mae.embed_patches(imgs), 0.0)
    with torch.no_grad():
        latent = mae.forward_encoder_packed(visible, sel.cu_seqlens, sel.max_seqlen).reshape(2, 1 + N, -1)
        feats = clf.vit.forward_features(imgs)
        pooled, logits = clf.forward_features_and_logits(imgs)
    if pool == "token":
        torch.testing.assert_close(feats, latent, atol=1e-5, rtol=1e-5)
    else:  # timm's avg pool: blocks -> mean of patch tokens -> fc_norm (= the MAE's final norm)
        torch.testing.assert_close(clf.vit.fc_norm.weight, mae.norm.weight)
        blocks_out = feats[:, 1:].mean(1)
        torch.testing.assert_close(pooled, clf.vit.fc_norm(blocks_out))
    assert logits.abs().max() < 1e-2  # head initialised near zero (MAE's fine-tuning init)


def test_pretrain_checkpoint_mismatch_errors():
    mae = tiny_mae()
    clf = tiny_classifier()
    with pytest.raises(ValueError, match="kind is 'finetune'"):
        clf.load_pretrain_checkpoint({**pretrain_state(mae), "kind": "finetune"})
    small = ViTClassifier("vit_small", 7, img_size=IMG, patch_size=PATCH, depth=DEPTH)
    with pytest.raises(ValueError, match=r"holds a vit_tiny encoder \(cls_token \(1, 1, 192\)\); --model vit_small "
                                         r"needs cls_token \(1, 1, 384\)"):
        small.load_pretrain_checkpoint(pretrain_state(mae))
    with pytest.raises(ValueError, match="model"):
        ViTClassifier.from_pretrain_checkpoint(pretrain_state(mae), num_classes=7, model="vit_base")
    with pytest.raises(TypeError, match="state"):
        clf.load_pretrain_checkpoint(["not", "a", "dict"])


def test_pretrain_checkpoint_into_another_patch_size_image_size_and_depth():
    """Sizes that differ from the checkpoint's are fitted (and named in the report), not refused: the
    patch embedding resampled by timm, the sin-cos table recomputed, a missing block initialised."""
    from timm.layers import resample_patch_embed

    mae = tiny_mae()
    clf = tiny_classifier(patch_size=16)
    report = clf.load_pretrain_checkpoint(pretrain_state(mae))
    w = mae.state_dict()["patch_embed.proj.weight"]
    assert torch.equal(clf.vit.patch_embed.proj.weight, resample_patch_embed(w, [16, 16]))
    assert torch.equal(clf.vit.pos_embed[0], sincos_2d(192, IMG // 16, cls_token=True))
    assert set(report.resampled) == {"pos_embed", "patch_embed.proj.weight"}
    deeper = tiny_classifier(depth=DEPTH + 1)
    report = deeper.load_pretrain_checkpoint(pretrain_state(mae))
    assert {k for k in report.kept_init if k.startswith("blocks.")} == {
        k for k in deeper.vit.state_dict() if k.startswith(f"blocks.{DEPTH}.")}
    clf = ViTClassifier.from_pretrain_checkpoint(pretrain_state(mae), num_classes=7, img_size=64)
    assert clf.img_size == 64 and clf.patch_size == PATCH and clf.vit.pos_embed.shape == (1, 1 + 64, 192)


def test_from_timm_weights_file(tmp_path, seed):
    gen = torch.Generator().manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=IMG, patch_size=PATCH,
                            depth=DEPTH, global_pool="token").eval()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    x = torch.randn(2, 3, IMG, IMG, generator=gen)
    clf = ViTClassifier.from_timm_weights(path, num_classes=7, global_pool="token").eval()
    with torch.no_grad():
        torch.testing.assert_close(clf(x), vit(x), atol=1e-5, rtol=1e-5)
    # Another class count: the encoder loads, the head keeps its fresh initialisation.
    torch.save({"model": vit.state_dict()}, tmp_path / "w.pth")
    clf3 = ViTClassifier.from_timm_weights(tmp_path / "w.pth", num_classes=3, global_pool="token")
    torch.testing.assert_close(clf3.vit.blocks[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight)
    with pytest.raises(ValueError, match=r"vit_small needs cls_token \(1, 1, 384\)"):
        ViTClassifier.from_timm_weights(path, num_classes=7, model="vit_small")
    with pytest.raises(ValueError, match="not found"):
        ViTClassifier.from_timm_weights(tmp_path / "missing.safetensors", num_classes=7)


def test_classifier_bad_input():
    with pytest.raises(ValueError, match="global_pool"):
        tiny_classifier(global_pool="max")
    with pytest.raises(ValueError, match="num_classes"):
        ViTClassifier("vit_tiny", 0)
    with pytest.raises(ValueError, match="model must be one of"):
        ViTClassifier("resnet50", 7)
    with pytest.raises(ValueError, match="x must be"):
        tiny_classifier()(torch.randn(1, 3, 16, 16))


def test_layer_decay_groups_follow_depth():
    from timm.optim import param_groups_layer_decay

    clf = tiny_classifier()
    groups = param_groups_layer_decay(clf, weight_decay=0.05, no_weight_decay_list=clf.no_weight_decay(),
                                      layer_decay=0.5)
    scale = {}
    for g in groups:
        for p in g["params"]:
            scale[id(p)] = g["lr_scale"]
    s = {n: scale[id(p)] for n, p in clf.named_parameters()}
    # stem < block 0 < block 1 < head (each a factor 0.5 apart).
    assert s["vit.patch_embed.proj.weight"] == pytest.approx(0.5 * s["vit.blocks.0.attn.qkv.weight"])
    assert s["vit.blocks.0.attn.qkv.weight"] == pytest.approx(0.5 * s["vit.blocks.1.attn.qkv.weight"])
    assert s["vit.head.weight"] == s["proj_head.0.weight"] == 1.0


# ------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("backend,dtype", [("auto", torch.bfloat16), ("torch_varlen", torch.bfloat16),
                                           ("auto", torch.float32), ("sdpa_padded", torch.float16)])
def test_varlen_attention_cuda(seed, backend, dtype):
    gen = torch.Generator().manual_seed(seed)
    cu = random_lengths_cu(9, 70, gen)
    T = int(cu[-1])
    q, k, v = (torch.randn(T, 4, 64, generator=gen).to("cuda", dtype).requires_grad_() for _ in range(3))
    out = varlen_attention(q, k, v, cu.cuda(), int((cu[1:] - cu[:-1]).max()), backend=backend)
    go = torch.randn(out.shape, generator=gen).to("cuda", dtype)  # every output element weighted differently
    (out.float() * go.float()).sum().backward()
    # float64 reference on the same (already rounded) inputs, its gradients by autograd
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref = per_sequence_attention(q64, k64, v64, cu)
    (ref * go.double().cpu()).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float().cpu(), ref.detach().float(), atol=tol, rtol=tol)
    # Gradients, with a tolerance in units u of the dtype's rounding: the kernels round P and dS to
    # the input dtype before their matmuls (bf16 u = 2^-8; fp16 u = 2^-10, one bit more for the fp16
    # logits of the padded math path; fp32 2^-14, fp32 accumulation in another order). The rounding
    # errors of a row add up like a random walk, far below the worst case; the bounds below are ~5x the
    # worst RMS estimate (dQ/dK sum dS_ij K_j with Σ_j dS_ij = 0: relative errors up to ~0.3 % in bf16).
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10, torch.float32: 2.0**-14}[dtype]
    bounds = cu.tolist()
    for name, got, want in (("q", q.grad, q64.grad), ("k", k.grad, k64.grad), ("v", v.grad, v64.grad)):
        got, want = got.double().cpu(), want
        assert torch.isfinite(got).all(), name
        diff = (got - want).abs()
        assert diff.max() <= 16 * u * want.abs().max(), (name, diff.max().item(), want.abs().max().item())
        rms = want.pow(2).mean().sqrt()
        for s, e in zip(bounds[:-1], bounds[1:]):  # per sequence: a mix-up between sequences is O(1)
            d_s, w_s = got[s:e] - want[s:e], want[s:e]
            allowed = 4 * u * (w_s.norm() + rms * math.sqrt(w_s.numel()))
            assert d_s.norm() <= allowed, (name, s, e, d_s.norm().item(), w_s.norm().item())


@pytest.mark.cuda
def test_auto_backend_is_varlen_in_any_context_on_cuda(monkeypatch):
    # As the packed encoder meets it: first resolved inside bf16 autocast (training) or no_grad /
    # inference_mode (evaluation, predict). Padded SDPA here would mean
    # the GPU step silently pays for attention over the padding (seen on the H200 before the fix).
    from amgsn.models import attention

    for ctx in (lambda: torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad, torch.inference_mode):
        monkeypatch.setattr(attention, "_SELF_CHECK", {})
        with ctx():
            chosen = attention.resolve_backend("auto", torch.device("cuda"), torch.bfloat16)
        assert chosen in ("torch_varlen", "flex"), attention._SELF_CHECK


def _cuda_encoder_case(seed: int):
    """A tiny MAE on CUDA and one batch of packed visible tokens (float32) for it."""
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mae().cuda()
    imgs = torch.randn(6, 3, IMG, IMG, generator=gen).cuda()
    visible, sel = model.random_masking(model.embed_patches(imgs), per_image_ratios(6, gen).cuda())
    return model, visible, sel


@pytest.mark.cuda
def test_packed_encoder_matches_padded_cuda_fp32(seed):
    # Without autocast both paths are float32 (TF32 is off for matmuls by default): only the packing
    # can make them differ, so the tolerance is fp32-sized.
    model, visible, sel = _cuda_encoder_case(seed)
    packed = model.forward_encoder_packed(visible, sel.cu_seqlens, sel.max_seqlen)
    padded = model.forward_encoder_padded(visible, sel.cu_seqlens, sel.max_seqlen)
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_packed_encoder_matches_padded_cuda_bf16(seed):
    model, visible, sel = _cuda_encoder_case(seed)
    with torch.no_grad():
        ref32 = model.forward_encoder_padded(visible, sel.cu_seqlens, sel.max_seqlen).float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model.forward_encoder_packed(visible, sel.cu_seqlens, sel.max_seqlen).float()
        padded = model.forward_encoder_padded(visible, sel.cu_seqlens, sel.max_seqlen).float()
    # bf16 autocast rounds every matmul output and residual sum (u = 2^-8, RMS ~u/sqrt(3) each); over the
    # tiny encoder's 2 blocks + norm the RMS relative error vs float32 is ~0.5 %: allow 4u = 1.6 % per
    # path and between the two (each token's rows are otherwise the same computation), and 16u of the
    # output's largest value element-wise (was 5e-2 absolute + 5e-2 relative: up to ~25 % of the max).
    u = 2.0**-8
    scale = ref32.norm()
    for got in (packed, padded):
        assert (got - ref32).norm() <= 4 * u * scale, ((got - ref32).norm() / scale).item()
    assert (packed - padded).norm() <= 4 * u * scale, ((packed - padded).norm() / scale).item()
    assert (packed - padded).abs().max() <= 16 * u * ref32.abs().max()
