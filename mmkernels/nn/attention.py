"""Attention modules on `mmkernels.cross_modal_attention`.

`CrossModalAttention`: queries of one modality attend to the tokens of M other
modalities, passed as M separate segments (no concatenation) with their valid
lengths; per-head tanh gates (Flamingo-style, initialised at 0 so a new block
starts as the identity) and a learned per-head modality bias.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmkernels.ops import cross_modal_attention


class CrossModalAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_sources: int, kv_dim: Optional[int] = None,
                 num_kv_heads: Optional[int] = None, gated: bool = True, modality_bias: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.num_sources = dim, num_heads, num_sources
        self.head_dim = dim // num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        kv_dim = kv_dim or dim
        self.backend = backend
        self.q_proj = nn.Linear(dim, dim)
        kvd = self.num_kv_heads * self.head_dim
        # one K/V projection per source modality (MulT-style pairwise projections)
        self.k_proj = nn.ModuleList(nn.Linear(kv_dim, kvd) for _ in range(num_sources))
        self.v_proj = nn.ModuleList(nn.Linear(kv_dim, kvd) for _ in range(num_sources))
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.head_gate = nn.Parameter(torch.zeros(num_heads)) if gated else None
        self.modality_bias = nn.Parameter(torch.zeros(num_heads, num_sources)) if modality_bias else None

    def forward(self, x: torch.Tensor, sources: Sequence[torch.Tensor], kv_lengths: Optional[torch.Tensor] = None,
                q_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim)
        keys = [p(s).view(B, s.shape[1], self.num_kv_heads, self.head_dim) for p, s in zip(self.k_proj, sources)]
        values = [p(s).view(B, s.shape[1], self.num_kv_heads, self.head_dim) for p, s in zip(self.v_proj, sources)]
        dt = q.dtype
        mb = None if self.modality_bias is None else self.modality_bias.to(dt)
        hg = None if self.head_gate is None else self.head_gate.to(dt)
        out = cross_modal_attention(q, keys, values, kv_lengths=kv_lengths, q_lengths=q_lengths,
                                    modality_bias=mb, head_gate=hg, backend=self.backend)
        return self.out_proj(out.reshape(B, L, self.dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 2, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class CrossModalBlock(nn.Module):
    """x <- x + attn(LN x, LN sources) (per-head tanh gates inside the op); x <- x + tanh(g) * FFN(LN x)."""

    def __init__(self, dim: int, num_heads: int, num_sources: int, ffn_mult: int = 2, dropout: float = 0.0,
                 backend: Optional[str] = None):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_sources))
        self.attn = CrossModalAttention(dim, num_heads, num_sources, gated=True, backend=backend)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ffn_mult, dropout)
        self.ff_gate = nn.Parameter(torch.zeros(1))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, sources, kv_lengths=None, q_lengths=None):
        src = [n(s) for n, s in zip(self.norm_kv, sources)]
        x = x + self.dropout(self.attn(self.norm_q(x), src, kv_lengths, q_lengths))
        x = x + torch.tanh(self.ff_gate) * self.dropout(self.ff(self.norm_ff(x)))
        return x


class SelfAttentionBlock(nn.Module):
    """Pre-LN transformer layer whose self-attention is `cross_modal_attention` with M = 1 (padding via kv_lengths)."""

    def __init__(self, dim: int, num_heads: int, ffn_mult: int = 2, dropout: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossModalAttention(dim, num_heads, 1, gated=False, modality_bias=False, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ffn_mult, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, lengths=None):
        h = self.norm1(x)
        kv = None if lengths is None else lengths.view(-1, 1)
        x = x + self.dropout(self.attn(h, [h], kv, lengths))
        return x + self.dropout(self.ff(self.norm2(x)))
