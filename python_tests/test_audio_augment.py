"""Training-time audio augmentation (mmkernels/models/augment.py): what each kind does to a signal
whose answer is known, that it stays inside the valid samples and frames, and that eval is untouched."""
import math

import numpy as np
import pytest
import torch

from mmkernels.models import augment as A
from mmkernels.models.augment import AudioAugmentation
from mmkernels.models.encoders import AudioEncoder

SR = 8000


def _tone(freq, n, T=SR):
    t = torch.arange(T, dtype=torch.float32) / SR
    return torch.sin(2 * math.pi * freq * t) * (torch.arange(T) < n)


def _peak_hz(x):
    spec = np.abs(np.fft.rfft(x.numpy()))
    return float(np.argmax(spec)) * SR / len(x)


def test_speed_perturb_scales_pitch_and_length():
    torch.manual_seed(0)
    wav = torch.stack([_tone(500, 6000) for _ in range(16)])
    lengths = torch.full((16,), 6000)
    out, new_len = A.speed_perturb(wav, lengths, 0.2)
    torch.manual_seed(0)
    rate = 0.8 + 0.4 * torch.rand(16, 1)  # the draw speed_perturb makes
    assert rate.min() < 0.95 and rate.max() > 1.05, "the draw should cover both directions"
    for i in range(16):
        r = float(rate[i])
        assert int(new_len[i]) == min(SR, int(6000 / r))
        assert out[i, int(new_len[i]):].abs().max() == 0
        n = int(new_len[i])
        assert abs(_peak_hz(out[i, :n]) - 500 * r) < 2 * SR / n + 1, (r, _peak_hz(out[i, :n]))


def test_noise_at_the_drawn_snr_only_on_valid_samples():
    torch.manual_seed(1)
    wav = torch.stack([_tone(300, 4000) for _ in range(64)])
    lengths = torch.full((64,), 4000)
    noisy = A.add_noise(wav, lengths, 10.0)
    assert torch.equal(noisy[:, 4000:], wav[:, 4000:])
    noise = (noisy - wav)[:, :4000]
    snr = 10 * torch.log10((wav[:, :4000] ** 2).mean(1) / (noise ** 2).mean(1))
    assert snr.min() > 9.0 and snr.max() < 41.0 and snr.max() - snr.min() > 10


def test_mel_warp_moves_a_band():
    torch.manual_seed(2)
    mel = torch.zeros(32, 5, 40)
    mel[:, :, 20] = 1.0
    out = A.warp_mel_axis(mel, 0.2)
    torch.manual_seed(2)
    factor = 0.8 + 0.4 * torch.rand(32)
    peak = out[:, 0].argmax(-1).float()
    assert torch.all((peak - 20 * factor).abs() <= 1.0)
    assert torch.allclose(A.warp_mel_axis(mel, 1e-9), mel, atol=1e-6)


def test_spec_masks_stay_in_valid_frames_and_widths():
    torch.manual_seed(3)
    mel = torch.randn(200, 50, 40).abs() + 0.1   # no zero before masking
    fl = torch.randint(1, 51, (200,))
    mel = mel * (torch.arange(50)[None, :, None] < fl[:, None, None])
    aug = AudioAugmentation(time_masks=2, freq_masks=0)
    out = aug.spectrogram(mel, fl)
    masked = (out == 0) & (mel != 0)
    frames = masked.all(-1)               # a time mask zeroes whole frames
    assert torch.equal(masked.any(-1), frames)
    assert frames.sum(1).max() <= 2 * A.TIME_MASK_FRAMES and frames.any()
    assert not (frames & (torch.arange(50)[None, :] >= fl[:, None])).any()
    out = AudioAugmentation(freq_masks=3).spectrogram(mel, fl)
    bins = ((out == 0) & (mel != 0)).any(1)
    assert bins.sum(1).max() <= 3 * A.FREQ_MASK_BINS and bins.any()


def test_encoder_augments_in_training_only():
    torch.manual_seed(4)
    enc = AudioEncoder(32, layers=1, heads=2, augmentation=AudioAugmentation(0.1, 0.1, 10, 2, 2))
    plain = AudioEncoder(32, layers=1, heads=2)
    plain.load_state_dict(enc.state_dict())
    wav = torch.randn(4, SR) * 0.3
    lengths = torch.tensor([SR, 5000, 3000, 800])
    enc.eval(), plain.eval()
    a, la = enc(wav, lengths)
    b, lb = plain(wav, lengths)
    assert torch.equal(a, b) and torch.equal(la, lb)
    enc.train(), plain.train()
    torch.manual_seed(5)
    c, _ = enc(wav, lengths)
    torch.manual_seed(5)
    c2, _ = enc(wav, lengths)
    assert torch.equal(c, c2), "the augmentation must draw from torch's generator (exact resume)"
    assert not torch.allclose(c, plain(wav, lengths)[0])


def test_augmentation_settings_checked():
    from mmkernels.models.config import ModelConfig
    with pytest.raises(ValueError, match="audio_speed_perturb"):
        ModelConfig(audio_speed_perturb=0.7)
    with pytest.raises(ValueError, match="audio_time_masks"):
        ModelConfig(audio_time_masks=-1)
    assert not AudioAugmentation().active and AudioAugmentation(noise_snr=5).active


def test_conv2d_frontend_same_token_grid_and_saved_model(tmp_path):
    from mmkernels.models.config import ModelConfig
    from mmkernels.models.fusion_model import FusionModel
    torch.manual_seed(6)
    wav = torch.randn(3, SR) * 0.3
    lengths = torch.tensor([SR, 4000, 100])
    a = AudioEncoder(32, heads=2, frontend="conv2d").eval()
    b = AudioEncoder(32, heads=2).eval()
    (xa, la), (xb, lb) = a(wav, lengths), b(wav, lengths)
    assert xa.shape == xb.shape and torch.equal(la, lb)
    with pytest.raises(ValueError, match="audio_frontend"):
        ModelConfig(audio_frontend="conv3d")
    cfg = ModelConfig(modalities=["audio"], d_model=32, num_heads=2, audio_frontend="conv2d", audio_noise_snr=10,
                      audio_time_masks=1, task="classification", num_labels=10)
    model = FusionModel(cfg).eval()
    batch = {"audio": wav, "audio_lengths": lengths}
    model.save_pretrained(str(tmp_path / "m"))
    again = FusionModel.from_pretrained(str(tmp_path / "m")).eval()
    assert torch.equal(model(batch)["logits"], again(batch)["logits"])
