"""Gated Multimodal Unit on `mmkernels.gated_fusion`, and the log-mel audio front end."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from mmkernels.ops import gated_fusion


class GatedMultimodalUnit(nn.Module):
    """GMU (Arevalo et al., 2017) generalised to M modalities:
    h = sum_m softmax_m(G_m [x_1..x_M]) * tanh(W_m x_m), over present modalities only."""

    def __init__(self, in_dims: Sequence[int], hidden: int, backend: Optional[str] = None):
        super().__init__()
        self.backend = backend
        self.proj = nn.ModuleList(nn.Linear(d, hidden) for d in in_dims)
        self.gate = nn.Linear(sum(in_dims), hidden * len(in_dims))
        self.hidden = hidden

    def forward(self, xs: Sequence[torch.Tensor], present: Optional[torch.Tensor] = None, return_gates: bool = False):
        """xs: M tensors (B, d_m); present: bool (M, B). Absent inputs are zeroed before the gate."""
        M = len(xs)
        if present is not None:
            xs = [x * present[m].to(x.dtype).unsqueeze(-1) for m, x in enumerate(xs)]
        feats = torch.stack([p(x) for p, x in zip(self.proj, xs)])                   # (M, B, H)
        logits = self.gate(torch.cat(list(xs), -1)).view(-1, M, self.hidden).transpose(0, 1)  # (M, B, H)
        return gated_fusion(feats, logits.contiguous(), present=present, activation="tanh",
                            return_gates=return_gates, backend=self.backend)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, fmin: float = 20.0, fmax: Optional[float] = None):
    """(n_fft//2+1, n_mels) triangular HTK-mel filterbank."""
    fmax = fmax or sample_rate / 2
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    inv = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)
    mpts = torch.linspace(mel(fmin), mel(fmax), n_mels + 2)
    fpts = torch.tensor([inv(float(m)) for m in mpts])
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    fb = torch.zeros(n_fft // 2 + 1, n_mels)
    for i in range(n_mels):
        lo, c, hi = fpts[i], fpts[i + 1], fpts[i + 2]
        up = (freqs - lo) / (c - lo)
        down = (hi - freqs) / (hi - c)
        fb[:, i] = torch.clamp(torch.minimum(up, down), min=0)
    return fb


class LogMelFrontEnd(nn.Module):
    """Waveform (B, T) float in [-1, 1] + lengths (B,) -> log-mel (B, frames, n_mels) + frame lengths,
    normalised per utterance over its valid frames."""

    def __init__(self, sample_rate: int = 8000, n_fft: int = 256, hop: int = 80, n_mels: int = 40):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("fb", mel_filterbank(n_fft, n_mels, sample_rate), persistent=False)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return lengths // self.hop + 1

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor):
        with torch.autocast(device_type=wav.device.type, enabled=False):  # log-mel in full precision
            return self._forward(wav, lengths)

    def _forward(self, wav: torch.Tensor, lengths: torch.Tensor):
        wav = wav.to(self.window.dtype) if wav.is_floating_point() else wav.float()
        spec = torch.stft(wav, self.n_fft, self.hop, window=self.window, center=True, return_complex=True)
        power = spec.real ** 2 + spec.imag ** 2                      # (B, F, frames)
        mel = torch.log(torch.matmul(power.transpose(1, 2), self.fb) + 1e-6)  # (B, frames, n_mels)
        fl = self.frame_lengths(lengths).clamp(max=mel.shape[1])
        mask = (torch.arange(mel.shape[1], device=wav.device)[None, :] < fl[:, None]).unsqueeze(-1).float()
        n = mask.sum(1, keepdim=True).clamp(min=1)
        mean = (mel * mask).sum(1, keepdim=True) / n
        var = (((mel - mean) * mask) ** 2).sum(1, keepdim=True) / n
        mel = (mel - mean) / torch.sqrt(var + 1e-5) * mask
        return mel, fl
