"""Speaker-held-out data (data.test_speaker, held-out takes, synthetic voices added to recordings) and
the leave-one-speaker-out runner (mmkernels-speakers), on a folder of FSDD-format tone recordings."""
import json
import os
import sys

import numpy as np
import pytest

from mmkernels.data import speech

sys.path.insert(0, os.path.dirname(__file__))
from train_fixtures import TINY_MODEL, TINY_TRAIN, run_cli  # noqa: E402
from utils import write_wav  # noqa: E402

SPEAKERS = ("ann", "bob", "cid")
TAKES = 6


@pytest.fixture(scope="module")
def tone_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdd")
    rng = np.random.default_rng(0)
    t = np.arange(3000) / 8000
    for si, spk in enumerate(SPEAKERS):
        for digit in range(10):
            for take in range(TAKES):
                x = 0.5 * np.sin(2 * np.pi * (180 + 60 * digit + 7 * si) * t) + 0.02 * rng.standard_normal(len(t))
                write_wav(d / f"{digit}_{spk}_{take}.wav", x)
    return str(d)


def test_held_out_takes_are_the_last_of_each_digit(tone_folder):
    by = speech.scan_fsdd(tone_folder)
    held = speech.held_out_takes(by["ann"], 0.34)
    assert len(held) == 10 * 2
    assert all(int(os.path.basename(p)[:-4].split("_")[2]) >= TAKES - 2 for p in held)
    assert speech.held_out_takes(by["ann"], 0.0) == set()
    one_take = [(d, p) for d, p in by["ann"] if p.endswith("_0.wav")]
    assert speech.held_out_takes(one_take, 0.5) == set(), "a digit's only take must stay in training"


def test_build_with_a_test_speaker(tone_folder, tmp_path):
    pytest.importorskip("mnist")
    from mmkernels.data.avmnist import AVMNISTConfig, build_avmnist, load_split
    cfg = AVMNISTConfig(n_train=60, n_val=20, n_test=30, images_train=200, images_val=100, images_test=100,
                        speech_dir=tone_folder, test_speaker="bob", val_takes=0.34)
    d = build_avmnist(cfg, cache_dir=str(tmp_path), progress=False)
    blobs = {s: load_split(os.path.join(d, f"{s}.pt")) for s in ("train", "val", "test", "test_heldout")}
    spk = {s: set(b["speakers"]) for s, b in blobs.items()}
    assert spk["test"] == spk["test_heldout"] == {"bob"}
    assert spk["train"] == spk["val"] == {"ann", "cid"}
    assert len(blobs["train"]["speakers"]) == 2 * 10 * (TAKES - 2) and len(blobs["val"]["speakers"]) == 2 * 10 * 2
    assert len(blobs["test"]["speakers"]) == 10 * TAKES
    # no clip of validation is a training clip (held-out takes), and the labels follow the clips
    tr, va = blobs["train"]["audio"], blobs["val"]["audio"]
    assert not any(bool((tr == v).all(1).any()) for v in va)
    b = blobs["test"]
    assert (b["audio_labels"][b["samples"][:, 1]] == b["samples"][:, 5]).all()


def test_synthetic_voices_join_training_only(tone_folder, tmp_path):
    pytest.importorskip("mnist")
    pytest.importorskip("espeakng_loader")
    from mmkernels.data.avmnist import AVMNISTConfig, build_avmnist, load_split
    cfg = AVMNISTConfig(n_train=60, n_val=20, n_test=30, images_train=200, images_val=100, images_test=100,
                        speech_dir=tone_folder, test_speaker="ann", synthetic_speakers=2)
    d = build_avmnist(cfg, cache_dir=str(tmp_path), progress=False)
    train = load_split(os.path.join(d, "train.pt"))
    synthetic = {s for s in train["speakers"] if s not in SPEAKERS}
    assert len(synthetic) == 2 and sum(s in synthetic for s in train["speakers"]) == 20
    for s in ("val", "test"):
        assert set(load_split(os.path.join(d, f"{s}.pt"))["speakers"]) <= set(SPEAKERS)


def _tiny(tone_folder, tmp_path):
    train = {**TINY_TRAIN, "final_eval": True, "epochs": 1, "output_dir": str(tmp_path / "loso")}
    return (["data.n_train=48", "data.n_val=16", "data.n_test=32", "data.images_train=300", "data.images_val=100",
             "data.images_test=100", f"data.speech_dir={tone_folder}", f"data.cache_dir={tmp_path / 'cache'}",
             "data.val_takes=0.34"] + TINY_MODEL + [f"train.{k}={v}" for k, v in train.items()])


def test_unknown_test_speaker_is_one_error_line(tone_folder, tmp_path):
    pytest.importorskip("mnist")
    r = run_cli([*_tiny(tone_folder, tmp_path), "data.test_speaker=zed"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: data.test_speaker 'zed'") and "ann, bob, cid" in r.stderr
    r = run_cli(["--config", "", "--speakers", "ann,zed", *_tiny(tone_folder, tmp_path)], module="mmkernels.train.speakers")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --speakers: no recordings of zed"), r.stderr


def test_data_set_settings_checked_everywhere(tone_folder, tmp_path, capsys):
    """The data set's own settings are checked by the data set (mmkernels-build-data too), and the
    boolean ones are switches there."""
    from mmkernels.data import build
    from mmkernels.data.avmnist import AVMNISTConfig
    with pytest.raises(ValueError, match="synthetic_speakers adds synthetic voices"):
        AVMNISTConfig(synthetic_speakers=5)
    with pytest.raises(ValueError, match="val_takes"):
        AVMNISTConfig(speech_dir=tone_folder, test_speaker="ann", val_takes=0)
    assert build.main(["--synthetic-speakers", "5", "--cache-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: synthetic_speakers adds synthetic voices")
    assert build.main(["--no-synthetic-accents", "--synthetic-accents", "--cache-dir", str(tmp_path)]) == 2
    assert "set speech_dir" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli(["--config", "", f"data.speech_dir={empty}"], module="mmkernels.train.speakers")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: no FSDD-format recordings"), r.stderr


def test_leave_one_speaker_out(tone_folder, tmp_path):
    pytest.importorskip("mnist")
    from mmkernels.train.speakers import REPORT_NAME, run_folds
    over = _tiny(tone_folder, tmp_path)
    summary = run_folds(None, over)
    out = tmp_path / "loso"
    assert list(summary["folds"]) == list(SPEAKERS)
    for spk in SPEAKERS:
        rep = json.loads((out / spk / "report.json").read_text())
        assert summary["folds"][spk]["accuracy"] == rep["test"]["accuracy"]
        assert summary["folds"][spk]["heard"] == rep["test"]["per_type"]["heard"]
        cfg = json.loads((out / spk / "run_config.json").read_text())
        assert cfg["data"]["test_speaker"] == spk
    accs = [summary["folds"][s]["accuracy"] for s in SPEAKERS]
    assert summary["mean_accuracy"] == pytest.approx(np.mean(accs)) and summary["std_accuracy"] == pytest.approx(np.std(accs))
    assert json.loads((out / REPORT_NAME).read_text())["mean_accuracy"] == summary["mean_accuracy"]
    assert (out / "speakers.png").stat().st_size > 1000
    # a rerun keeps finished folds: nothing is trained again
    stamps = {s: (out / s / "report.json").stat().st_mtime_ns for s in SPEAKERS}
    (out / "bob" / "report.json").unlink()          # as if the run had died in bob's final evaluation
    again = run_folds(None, over)
    assert all((out / s / "report.json").stat().st_mtime_ns == stamps[s] for s in ("ann", "cid"))
    assert (out / "bob" / "report.json").exists() and set(again["folds"]) == set(SPEAKERS)
    # a run over some speakers (the other half running side by side) reports every finished fold
    part = run_folds(None, over, speakers=["cid"])
    assert list(part["folds"]) == list(SPEAKERS) and part["mean_accuracy"] == pytest.approx(again["mean_accuracy"])
    assert json.loads((out / REPORT_NAME).read_text())["folds"].keys() == set(SPEAKERS)
