"""Fixed 2D sin-cos position embedding (MAE, MoCo v3), and setting it into a timm ViT.

Half of the channels encode the column, half the row; each half is ``[sin(pos * w), cos(pos * w)]``
with frequencies ``w_i = 1 / temperature ** (i / (D / 4))``. Tokens are in row-major order, as
timm's ``PatchEmbed`` flattens them; prefix tokens (class / register) get zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError


def sincos_1d(dim: int, pos: torch.Tensor, temperature: float = 10000.0) -> torch.Tensor:
    """(M,) positions -> (M, dim) embedding ``[sin(pos * w), cos(pos * w)]``."""
    omega = 1.0 / temperature ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, grid_h: int, grid_w: int, num_prefix: int = 0,
              temperature: float = 10000.0) -> torch.Tensor:
    """(1, num_prefix + grid_h * grid_w, dim): column code in the first half, row code in the second."""
    if dim % 4:
        raise ConfigError(f"backbone: the 2D sin-cos position embedding needs an embedding dim divisible by 4, "
                          f"got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten(), temperature),
                     sincos_1d(dim // 2, rows.flatten(), temperature)], dim=1)
    return torch.cat([torch.zeros(num_prefix, dim), emb])[None]


def set_sincos_pos_embed(vit: nn.Module) -> None:
    """Replace a timm ViT's learned ``pos_embed`` by the fixed 2D sin-cos one (requires_grad=False)."""
    if getattr(vit, "pos_embed", None) is None:
        raise ConfigError("backbone: this ViT has no absolute position embedding to replace")
    h, w = vit.patch_embed.grid_size
    prefix = 0 if getattr(vit, "no_embed_class", False) else int(getattr(vit, "num_prefix_tokens", 1))
    table = sincos_2d(vit.pos_embed.shape[-1], h, w, prefix)
    if table.shape != vit.pos_embed.shape:
        raise ConfigError(f"backbone: position embedding of shape {tuple(vit.pos_embed.shape)} does not match "
                          f"a {h}x{w} patch grid with {prefix} prefix token(s)")
    with torch.no_grad():
        vit.pos_embed.copy_(table)
    vit.pos_embed.requires_grad_(False)
