"""Image and audio encoders producing token sequences (B, L, d) + valid lengths (B,)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from mmkernels.nn.attention import SelfAttentionBlock
from mmkernels.nn.fusion import LogMelFrontEnd


class ImageEncoder(nn.Module):
    """Small CNN (3 convs, 2 with stride 2): uint8/float (B, 28, 28) -> 7x7 = 49 tokens of width d."""

    def __init__(self, dim: int, channels: int = 32, layers: int = 0, heads: int = 4, dropout: float = 0.0,
                 backend: Optional[str] = None):
        super().__init__()
        c = channels
        self.cnn = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.GELU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * c, dim, 3, stride=2, padding=1),
        )
        self.pos = nn.Parameter(torch.zeros(1, 49, dim))
        nn.init.normal_(self.pos, std=0.02)
        # global summary token (token 0): a linear map of the whole 7x7 grid (spatial layout kept)
        self.summary = nn.Sequential(nn.Linear(49 * dim, dim), nn.GELU())
        self.blocks = nn.ModuleList(SelfAttentionBlock(dim, heads, dropout=dropout, backend=backend) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor):
        """-> tokens (B, 50, d): [summary, 49 patches], lengths (B,)"""
        x = image.to(self.pos.dtype)
        if image.dtype == torch.uint8:
            x = x / 255.0
        x = (x - 0.13) / 0.31
        x = self.cnn(x.unsqueeze(1))                       # (B, d, 7, 7)
        x = torch.nn.functional.gelu(x).flatten(2).transpose(1, 2)  # (B, 49, d)
        x = torch.cat([self.summary(x.flatten(1)).unsqueeze(1), x + self.pos], 1)
        for b in self.blocks:
            x = b(x)
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.int32, device=x.device)
        return self.norm(x), lengths


class AudioEncoder(nn.Module):
    """Waveform -> log-mel (10 ms hop) -> 2 conv layers (stride 2 each: 40 ms tokens) -> transformer layers (self-attention on the op)."""

    def __init__(self, dim: int, n_mels: int = 40, layers: int = 1, heads: int = 4, dropout: float = 0.0,
                 max_frames: int = 256, backend: Optional[str] = None):
        super().__init__()
        self.frontend = LogMelFrontEnd(n_mels=n_mels)
        self.conv = nn.Sequential(nn.Conv1d(n_mels, dim, 3, stride=2, padding=1), nn.GELU(),
                                  nn.Conv1d(dim, dim, 3, stride=2, padding=1), nn.GELU())
        self.pos = nn.Parameter(torch.zeros(1, max_frames, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(SelfAttentionBlock(dim, heads, dropout=dropout, backend=backend) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor):
        x = wav.to(self.pos.dtype)
        if wav.dtype == torch.int16:
            x = x / 32768.0
        mel, fl = self.frontend(x, lengths)                         # (B, F, n_mels)
        x = self.conv(mel.transpose(1, 2)).transpose(1, 2)         # (B, ceil(ceil(F/2)/2), d)
        fl = torch.div(fl + 1, 2, rounding_mode="floor")
        fl = torch.div(fl + 1, 2, rounding_mode="floor").clamp(min=1, max=x.shape[1]).to(torch.int32)
        x = x + self.pos[:, : x.shape[1]]
        for b in self.blocks:
            x = b(x, fl)
        return self.norm(x), fl
