"""An MAE-shaped model built from timm blocks, with MAE's algorithm written out (facebookresearch/mae,
models_mae.py: random_masking, forward_encoder, forward_decoder, forward_loss) — the repository does not
vendor MAE's file. Used by test_dropin.py (our random_masking against MAE's) and test_readme.py (the
README's drop-in snippets patched into it). Tiny sizes: 32 px images, 8 px patches (L = 16)."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block, PatchEmbed
from torch import nn


def mae_random_masking(x, mask_ratio, noise=None, stable=False):
    """MAE's random_masking, with its noise as an argument: argsort uniform noise, keep the first
    len_keep, mask 0 = keep / 1 = remove, unshuffled. ``stable`` sorts ties by index (MAE's argsort is
    unstable: ties are left open)."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1, stable=stable)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


class TinyMAE(nn.Module):
    def __init__(self, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                 decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=True):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, L + 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_dim) * 0.02)
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, L + 1, decoder_dim) * 0.02)
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, qkv_bias=True)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * 3)
        self.norm_pix_loss = norm_pix_loss

    def patchify(self, imgs):
        p = self.patch_embed.patch_size[0]
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * w, p * p * 3)

    def random_masking(self, x, mask_ratio):
        return mae_random_masking(x, mask_ratio)

    def forward_encoder(self, imgs, mask_ratio):
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def twin(model: TinyMAE, **methods) -> TinyMAE:
    """A copy of ``model`` (same weights) whose class has ``methods`` replaced — e.g. the README's
    ``random_masking``."""
    cls = type("PatchedMAE", (type(model),), methods)
    other = cls.__new__(cls)
    other.__dict__ = {**model.__dict__}
    return other
