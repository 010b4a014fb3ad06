"""Training-time audio augmentation, the kinds speech models train with: speed perturbation (the
waveform resampled: tempo and pitch change together), white noise at a random SNR, a warp of the mel
axis (pitch and formants move, tempo stays: vocal tract length perturbation) and SpecAugment-style
time and frequency masks. Batched on the model's device, drawn from torch's global generator (so the
checkpoint's RNG state makes a resumed run draw the same), and never applied in eval mode."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# SpecAugment widths for one-word clips (~40 frames of 10 ms, 40 mel bins): wider masks erase a syllable
TIME_MASK_FRAMES = 6
FREQ_MASK_BINS = 5


@dataclass
class AudioAugmentation:
    speed: float = 0.0       # waveform resampled by a factor in [1 - speed, 1 + speed]
    pitch: float = 0.0       # mel axis warped by a factor in [1 - pitch, 1 + pitch]
    noise_snr: float = 0.0   # white noise at an SNR drawn in [noise_snr, noise_snr + 30] dB; 0: none
    time_masks: int = 0      # masks of up to TIME_MASK_FRAMES frames each
    freq_masks: int = 0      # masks of up to FREQ_MASK_BINS mel bins each

    @property
    def active(self) -> bool:
        return bool(self.speed or self.pitch or self.noise_snr or self.time_masks or self.freq_masks)

    def waveform(self, wav: torch.Tensor, lengths: torch.Tensor):
        """wav float (B, T), lengths (B,) -> augmented wav (B, T) (zero past the new lengths), new lengths."""
        if self.speed:
            wav, lengths = speed_perturb(wav, lengths, self.speed)
        if self.noise_snr:
            wav = add_noise(wav, lengths, self.noise_snr)
        return wav, lengths

    def spectrogram(self, mel: torch.Tensor, frame_lengths: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel (B, frames, n_mels), zero past the valid frames -> augmented log-mel."""
        if self.pitch:
            mel = warp_mel_axis(mel, self.pitch)
        if self.time_masks:
            mel = _mask_runs(mel, frame_lengths, self.time_masks, TIME_MASK_FRAMES, dim=1)
        if self.freq_masks:
            full = torch.full_like(frame_lengths, mel.shape[2])
            mel = _mask_runs(mel, full, self.freq_masks, FREQ_MASK_BINS, dim=2)
        return mel


def _uniform(shape, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, device=like.device, dtype=torch.float32)


def _lerp_gather(x: torch.Tensor, pos: torch.Tensor, dim: int) -> torch.Tensor:
    """x sampled at fractional positions `pos` along `dim` (linear interpolation, clamped at the ends)."""
    n = x.shape[dim]
    pos = pos.clamp(0, n - 1)
    i0 = pos.floor().long()
    i1 = (i0 + 1).clamp(max=n - 1)
    w = (pos - i0).to(x.dtype)
    return x.gather(dim, i0) * (1 - w) + x.gather(dim, i1) * w


def speed_perturb(wav: torch.Tensor, lengths: torch.Tensor, max_change: float):
    """Each clip played at a rate in [1 - max_change, 1 + max_change] (> 1: shorter and higher), cut at T."""
    B, T = wav.shape
    rate = _uniform((B, 1), 1 - max_change, 1 + max_change, wav)
    pos = torch.arange(T, device=wav.device, dtype=torch.float32)[None, :] * rate
    out = _lerp_gather(wav, pos, 1)
    new_len = torch.floor(lengths.to(torch.float32) / rate[:, 0]).clamp(1, T).to(lengths.dtype)
    keep = torch.arange(T, device=wav.device)[None, :] < new_len[:, None]
    return out * keep.to(out.dtype), new_len


def add_noise(wav: torch.Tensor, lengths: torch.Tensor, min_snr_db: float) -> torch.Tensor:
    """White noise over each clip's valid samples at an SNR drawn in [min_snr_db, min_snr_db + 30] dB."""
    B, T = wav.shape
    keep = (torch.arange(T, device=wav.device)[None, :] < lengths[:, None]).to(wav.dtype)
    power = (wav * wav * keep).sum(1) / keep.sum(1).clamp(min=1)
    snr = _uniform((B,), min_snr_db, min_snr_db + 30.0, wav)
    std = torch.sqrt(power / torch.pow(10.0, snr / 10)).to(wav.dtype)
    return wav + torch.randn(wav.shape, device=wav.device, dtype=wav.dtype) * std[:, None] * keep


def warp_mel_axis(mel: torch.Tensor, max_change: float) -> torch.Tensor:
    """Each clip's mel axis stretched by a factor in [1 - max_change, 1 + max_change] (> 1: content moves up)."""
    B, F, n_mels = mel.shape
    factor = _uniform((B, 1, 1), 1 - max_change, 1 + max_change, mel)
    pos = (torch.arange(n_mels, device=mel.device, dtype=torch.float32)[None, None, :] / factor).expand(B, F, n_mels)
    return _lerp_gather(mel, pos, 2)


def _mask_runs(x: torch.Tensor, valid: torch.Tensor, count: int, max_width: int, dim: int) -> torch.Tensor:
    """`count` runs of 0..max_width positions along `dim` (within each row's `valid` first ones) set to 0."""
    B, n = x.shape[0], x.shape[dim]
    idx = torch.arange(n, device=x.device)[None, :]
    hit = torch.zeros(B, n, dtype=torch.bool, device=x.device)
    for _ in range(count):
        width = torch.floor(_uniform((B,), 0, max_width + 1, x)).long().clamp(max=max_width)
        room = (valid.long() - width).clamp(min=0)
        start = torch.floor(_uniform((B,), 0, 1, x) * (room + 1).to(torch.float32)).long()
        hit |= (idx >= start[:, None]) & (idx < (start + width)[:, None])
    shape = [B, 1, 1]
    shape[dim] = n
    return x.masked_fill(hit.view(shape), 0.0)
