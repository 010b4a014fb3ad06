"""Image and audio encoders producing token sequences (B, L, d) + valid lengths (B,)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from mmkernels.models.augment import AudioAugmentation
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


class SpectrogramConv2d(nn.Module):
    """Log-mel (B, n_mels, frames) -> (B, d, ceil(ceil(frames/2)/2)): two 3x3 convolutions over time and
    frequency, stride 2 on both, then the frequency rows flattened and projected. A pattern shifted along
    the mel axis (another speaker's formants) meets the same filters, which a convolution over time with
    the mel bins as channels cannot offer."""

    def __init__(self, n_mels: int, dim: int, channels: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.GELU(),
                                 nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GELU())
        rows = (((n_mels + 1) // 2) + 1) // 2
        self.proj = nn.Sequential(nn.Linear(channels * rows, dim), nn.GELU())

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        y = self.net(mel.transpose(1, 2).unsqueeze(1))        # (B, c, frames', mels')
        y = self.proj(y.permute(0, 2, 1, 3).flatten(2))        # (B, frames', d)
        return y.transpose(1, 2)


class AudioEncoder(nn.Module):
    """Waveform -> log-mel (10 ms hop) -> 2 conv layers (stride 2 each: 40 ms tokens; over time with the
    mel bins as channels, or over time and frequency) -> transformer layers (self-attention on the op)."""

    def __init__(self, dim: int, n_mels: int = 40, layers: int = 1, heads: int = 4, dropout: float = 0.0,
                 max_frames: int = 256, backend: Optional[str] = None,
                 augmentation: Optional[AudioAugmentation] = None, frontend: str = "conv1d", channels: int = 32):
        super().__init__()
        self.augmentation = augmentation if augmentation is not None and augmentation.active else None
        self.frontend = LogMelFrontEnd(n_mels=n_mels)
        if frontend == "conv2d":
            self.conv = SpectrogramConv2d(n_mels, dim, channels)
        elif frontend == "conv1d":
            self.conv = nn.Sequential(nn.Conv1d(n_mels, dim, 3, stride=2, padding=1), nn.GELU(),
                                      nn.Conv1d(dim, dim, 3, stride=2, padding=1), nn.GELU())
        else:
            raise ValueError(f"model.audio_frontend must be 'conv1d' or 'conv2d', got {frontend!r}")
        self.pos = nn.Parameter(torch.zeros(1, max_frames, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(SelfAttentionBlock(dim, heads, dropout=dropout, backend=backend) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor):
        x = wav.to(self.pos.dtype)
        if wav.dtype == torch.int16:
            x = x / 32768.0
        augment = self.augmentation if self.training else None
        if augment is not None:
            x, lengths = augment.waveform(x, lengths)
        mel, fl = self.frontend(x, lengths)                         # (B, F, n_mels)
        if augment is not None:
            mel = augment.spectrogram(mel, fl)
        x = self.conv(mel.transpose(1, 2)).transpose(1, 2)         # (B, ceil(ceil(F/2)/2), d)
        fl = torch.div(fl + 1, 2, rounding_mode="floor")
        fl = torch.div(fl + 1, 2, rounding_mode="floor").clamp(min=1, max=x.shape[1]).to(torch.int32)
        x = x + self.pos[:, : x.shape[1]]
        for b in self.blocks:
            x = b(x, fl)
        return self.norm(x), fl
