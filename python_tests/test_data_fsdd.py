"""FSDD-format real speech: loader, disjoint speaker split, data set built from recordings."""
import os

import numpy as np
import pytest

from mmkernels.data import speech
from utils import write_wav

FSDD = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fsdd")
FSDD = os.environ.get("MMKERNELS_FSDD", FSDD if os.path.isdir(FSDD) else "/work/shared/data/fsdd")
needs_fsdd = pytest.mark.skipif(not os.path.isdir(FSDD), reason="FSDD recordings not present")


def test_scan_and_split_synthetic_folder(tmp_path):
    t = np.arange(4000) / 8000
    for spk in ("ann", "bob", "cid", "dan", "eve"):
        for d in range(10):
            write_wav(tmp_path / f"{d}_{spk}_0.wav", 0.5 * np.sin(2 * np.pi * (200 + 50 * d) * t))
    (tmp_path / "README.md").write_text("not a recording")
    by = speech.scan_fsdd(str(tmp_path))
    assert sorted(by) == ["ann", "bob", "cid", "dan", "eve"] and all(len(v) == 10 for v in by.values())
    sp = speech.split_speakers(list(by), seed=0)
    assert set(sp["train"]) | set(sp["val"]) | set(sp["test"]) == set(by)
    assert not set(sp["train"]) & set(sp["test"]) and sp["val"] and sp["test"]
    x = speech.load_audio(by["ann"][3][1])
    assert x.dtype == np.float32 and abs(np.abs(x).max() - 0.9) < 1e-3


def test_wav_resampled_and_malformed(tmp_path):
    write_wav(tmp_path / "a.wav", 0.3 * np.sin(np.arange(16000) / 5), sr=16000)
    assert abs(len(speech.load_audio(str(tmp_path / "a.wav"))) - 8000) < 200
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(ValueError, match="malformed WAV file .*bad.wav"):
        speech.read_wav(str(tmp_path / "bad.wav"))
    with pytest.raises(ValueError, match="at least 3 speakers"):
        speech.split_speakers(["a", "b"])
    with pytest.raises(FileNotFoundError):
        speech.scan_fsdd(str(tmp_path / "missing"))


@needs_fsdd
def test_fsdd_folder():
    by = speech.scan_fsdd(FSDD)
    assert len(by) >= 3 and sum(len(v) for v in by.values()) >= 100
    sp = speech.split_speakers(list(by))
    assert len({s for v in sp.values() for s in v}) == len(by)
    assert not set(sp["train"]) & (set(sp["val"]) | set(sp["test"]))
    digit, path = by[sorted(by)[0]][0]
    x = speech.load_audio(path)
    assert 0 <= digit <= 9 and 500 < len(x) < 3 * speech.SAMPLE_RATE


@needs_fsdd
def test_build_with_fsdd(tmp_path):
    pytest.importorskip("mnist")
    import torch
    from mmkernels.data.avmnist import AVMNISTConfig, build_avmnist, load_split
    d = build_avmnist(AVMNISTConfig(n_train=50, n_val=20, n_test=20, images_train=200, images_val=100,
                                    images_test=100, speech_dir=FSDD), cache_dir=str(tmp_path), progress=False)
    spk = {s: set(load_split(os.path.join(d, f"{s}.pt"))["speakers"]) for s in ("train", "val", "test")}
    assert spk["train"] and spk["val"] and spk["test"]
    assert not spk["train"] & spk["test"] and not spk["train"] & spk["val"]
    b = load_split(os.path.join(d, "test.pt"))
    assert torch.equal(b["audio_labels"][b["samples"][:, 1]], b["samples"][:, 5])
