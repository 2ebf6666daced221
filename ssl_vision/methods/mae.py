"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

The encoder is the timm ViT backbone itself (its patch_embed, cls_token, pos_embed, blocks and
norm), run only on the visible ~25% of the patches; a light decoder with mask tokens and a fixed
2D sin-cos position embedding reconstructs the pixels of the masked patches.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..losses import mae_loss
from ..pos_embed import set_sincos_pos_embed, sincos_2d
from .base import SSLMethod


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, pixels as (p, p, C).

    Views and a permute only (no arithmetic, so autocast never lowers the target's precision)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, q, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, p: int, c: int = 3) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W) for a square grid; the inverse of ``patchify``."""
    b, n, _ = patches.shape
    g = int(round(n ** 0.5))
    x = patches.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, q)
    return x.reshape(b, c, g * p, g * p)


def random_masking(x: torch.Tensor, ratio: float, noise: torch.Tensor | None = None):
    """Keep a random ``1 - ratio`` of each sample's tokens, by argsort of uniform noise.

    x: (B, L, D) -> (kept (B, L_keep, D), mask (B, L) with 1 = removed, ids_restore (B, L)) where
    ``L_keep = int(L * (1 - ratio))`` and ``ids_restore`` puts the shuffled sequence back in order.
    noise: (B, L), drawn uniformly when None; the tokens with the smallest noise are kept.
    """
    b, n, d = x.shape
    keep = int(n * (1 - ratio))
    noise = torch.rand(b, n, device=x.device) if noise is None else noise.to(x.device)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the smallest noise values are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


class MAE(SSLMethod):
    backbone_kinds = ("vit",)

    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        m, vit = self.cfg.method, self.backbone
        if m.get("sincos_pos_embed", True):
            set_sincos_pos_embed(vit)  # fixed, as in MAE's encoder
        self.patch = int(vit.patch_embed.patch_size[0])
        self.num_prefix = int(vit.num_prefix_tokens)
        gh, gw = vit.patch_embed.grid_size
        dim = int(m.decoder_dim)
        self.decoder_embed = nn.Linear(vit.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(dim, gh, gw, self.num_prefix), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.Sequential(*[Block(dim, int(m.decoder_heads), mlp_ratio=4.0, qkv_bias=True,
                                                    norm_layer=norm) for _ in range(int(m.decoder_depth))])
        self.decoder_norm = norm(dim)
        self.decoder_pred = nn.Linear(dim, self.patch ** 2 * 3)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """``initialize_weights`` of facebookresearch/mae models_mae.py, for encoder and decoder alike:
        every Linear xavier-uniform with zero bias, every LayerNorm weight 1 / bias 0, the patch
        embedding xavier-uniform as a Linear over the flattened patch (its bias keeps nn.Conv2d's
        default, redrawn here so it does not depend on timm's init), class and mask tokens N(0, 0.02).
        The position embeddings are the fixed sin-cos tables set above."""
        proj = self.backbone.patch_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        if proj.bias is not None:
            bound = 1 / math.sqrt(proj.weight[0].numel())  # nn.Conv2d.reset_parameters' bias bound
            nn.init.uniform_(proj.bias, -bound, bound)
        for token in (self.backbone.cls_token, self.mask_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)
        for mod in [self.backbone, self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            for sub in mod.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.xavier_uniform_(sub.weight)
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)
                elif isinstance(sub, nn.LayerNorm):
                    nn.init.ones_(sub.weight)
                    nn.init.zeros_(sub.bias)

    def encode(self, images: torch.Tensor, ratio: float):
        """Run the ViT on the visible patches only: (latent (B, prefix + L_keep, D), mask, ids_restore)."""
        vit = self.backbone
        x = vit.patch_embed(images)  # (B, L, D)
        pos = vit.pos_embed
        npos = 0 if vit.no_embed_class else self.num_prefix
        x = x + pos[:, npos:]
        x, mask, ids_restore = random_masking(x, ratio, noise=self.keyed_rand("mae_mask", x.shape[1], like=x))
        prefix = [t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if prefix:
            tokens = torch.cat(prefix, dim=1)
            x = torch.cat([tokens + pos[:, :npos] if npos else tokens, x], dim=1)
        x = vit.norm_pre(vit.pos_drop(x))
        return vit.norm(vit.blocks(x)), mask, ids_restore

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, prefix + L_keep, D) -> predicted pixels of every patch (B, L, p*p*3)."""
        x = self.decoder_embed(latent)
        prefix, visible = x[:, :self.num_prefix], x[:, self.num_prefix:]
        b, n = ids_restore.shape
        masked = self.mask_token.expand(b, n - visible.shape[1], -1)
        x = torch.cat([visible, masked], dim=1)  # shuffled order; put back in place:
        x = x.gather(1, ids_restore[:, :, None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([prefix, x], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, self.num_prefix:])

    def forward_views(self, views):
        images = views[0]
        m = self.cfg.method
        latent, mask, ids_restore = self.encode(images, float(m.mask_ratio))
        pred = self.decode(latent, ids_restore)
        loss = mae_loss(pred, patchify(images, self.patch), mask, bool(m.norm_pix_loss))
        feats = None
        if not self.training or self.features_needed():
            with torch.no_grad():  # the online probe (and kNN bank) read the encoder on the whole, unmasked image
                feats = self.backbone(images)
        return {"loss": loss, "feats": feats, "mask": mask, "pred": pred}
