"""Heads on top of the encoders: attention pooling, the MAE decoder, and T3D's text-informed view fusion."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MAEConfig
from .vision import Block, sincos_position_3d


class LearnedToken(nn.Module):
    """A learned vector broadcast over the leading dimensions of a reference tensor.

    A module of its own (not a bare ``nn.Parameter`` of a bigger module) so that opacus, which computes
    per-sample gradients module by module, can give it one: ``forward(ref [B, n, *])`` returns
    ``[B, n, width]``, a function of the sample's own ``ref`` shape only. Pass a ``ref`` that needs no
    gradient (detach it): a backward hook on a module whose inputs need gradients waits for theirs.
    """

    def __init__(self, width: int, std: float = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width) * std)

    def forward(self, ref: Tensor) -> Tensor:
        return self.weight.expand(*ref.shape[:-1], self.weight.shape[0])


class AttentionPool(nn.Module):
    """Multi-head attention pooling: one learned query attends over the valid tokens.

    Built from Linear layers and SDPA rather than ``nn.MultiheadAttention``, which opacus refuses.

    Args:
        width: token width. heads: attention heads (``width`` must be divisible by it).
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"pooling width {width} should be divisible by pool_heads {heads}.")
        self.heads = heads
        self.query = LearnedToken(width)
        self.norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, tokens: Tensor, valid: Tensor | None = None) -> Tensor:
        b, n, w = tokens.shape
        h = self.heads
        x = self.norm(tokens)
        q = self.q(self.query(tokens[:, :1].detach())).reshape(b, 1, h, w // h).transpose(1, 2)  # [B, h, 1, w/h]
        k, v = self.kv(x).reshape(b, n, 2, h, w // h).permute(2, 0, 3, 1, 4)  # [B, h, N, w/h] each
        mask = None if valid is None else valid[:, None, None, :]
        pooled = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, h, 1, w/h]
        return self.out(pooled.transpose(1, 2).reshape(b, w))


class MAEDecoder(nn.Module):
    """MAE's narrow decoder: visible tokens plus mask tokens, unshuffled, reconstruct patch intensities.

    Args:
        encoder_width: width of the encoder tokens. cfg: the ``mae`` config section.
        patch_numel: voxels per patch times channels (the regression target size).
    """

    def __init__(self, encoder_width: int, cfg: MAEConfig, patch_numel: int) -> None:
        super().__init__()
        self.width = cfg.decoder_width
        self.embed = nn.Linear(encoder_width, cfg.decoder_width)
        self.mask_token = LearnedToken(cfg.decoder_width)
        self.blocks = nn.ModuleList(Block(cfg.decoder_width, cfg.decoder_heads) for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(cfg.decoder_width)
        self.pred = nn.Linear(cfg.decoder_width, patch_numel)

    def forward(self, visible: Tensor, ids_restore: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """``visible [B, K, W_enc]`` -> predictions ``[B, N, patch_numel]`` for every patch (raster order)."""
        x = self.embed(visible)
        b, k, w = x.shape
        n = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token(ids_restore[:, k:, None])], dim=1)
        x = torch.gather(x, 1, ids_restore[:, :, None].expand(b, n, w))  # unshuffle to raster order
        x = x + sincos_position_3d(grid, self.width, x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))


class ViewTextFusion(nn.Module):
    """T3D's text-informed refinement: one cross-attention block from view tokens to report tokens.

    Args:
        width: vision token width. text_width: hidden size of the text encoder. heads: attention heads.
    """

    def __init__(self, width: int, text_width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion width {width} should be divisible by heads {heads}.")
        self.heads = heads
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(text_width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(text_width, 2 * width)
        self.out = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, view_tokens: Tensor, text_tokens: Tensor, text_valid: Tensor) -> Tensor:
        """``view_tokens [V, N, W]``, ``text_tokens [V, T, Wt]``, ``text_valid [V, T]`` -> ``[V, N, W]``."""
        v, n, w = view_tokens.shape
        t = text_tokens.shape[1]
        h = self.heads
        q = self.q(self.norm_q(view_tokens)).reshape(v, n, h, w // h).transpose(1, 2)
        k, val = self.kv(self.norm_kv(text_tokens)).reshape(v, t, 2, h, w // h).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, val, attn_mask=text_valid[:, None, None, :].bool())
        x = view_tokens + self.out(attended.transpose(1, 2).reshape(v, n, w))
        return x + self.mlp(self.norm_mlp(x))
