"""Checkpoint and run-folder files: plain data loaded with weights_only (a crafted file cannot run
code), atomic writes that fsync the folder after the rename, stale temp files removed at the next start,
RNG states round-trip through a checkpoint."""
import json
import os
import random

import numpy as np
import pytest
import torch

from mmkernels.utils import atomic
from mmkernels.train import checkpoint as C
from utils import record_fsync


class _RunsCode:
    """Unpickling this calls open(path, 'w'): a checkpoint holding it would create the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _valid(**extra):
    return {"format": C.CKPT_FORMAT, "model": {"w": torch.ones(2)}, "optimizer": {}, "scheduler": {},
            "rng": [C.rng_state()], "state": {"global_step": 1}, "config": {}, **extra}


def test_crafted_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "code_ran"
    p = tmp_path / "checkpoint.pt"
    torch.save(_valid(evil=_RunsCode(str(marker))), p)
    with pytest.raises(C.CheckpointError, match=r"refused: .*checkpoint.pt holds objects other than tensors and "
                                                r"plain data \(.*open\)") as e:
        C.load_checkpoint(str(p))
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_checkpoint_with_rng_states_round_trips_weights_only(tmp_path):
    p = str(tmp_path / "checkpoint.pt")
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    C.atomic_torch_save(_valid(), p)
    torch.load(p, weights_only=True)  # plain tensors, dicts, lists, numbers and strings only
    ck = C.load_checkpoint(p)
    expect = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    C.set_rng_state(ck["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expect


def test_garbage_and_truncated_checkpoints_are_one_line_errors(tmp_path, recwarn):
    p = tmp_path / "checkpoint.pt"
    p.write_bytes(b"\x80garbage")
    with pytest.raises(C.CheckpointError, match="corrupt checkpoint") as e:
        C.load_checkpoint(str(p))
    assert "\n" not in str(e.value)
    C.atomic_torch_save(_valid(), str(p))
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(C.CheckpointError, match="corrupt checkpoint") as e:
        C.load_checkpoint(str(p))
    assert "\n" not in str(e.value)
    assert not [w for w in recwarn.list if "pickle" in str(w.message)]


def test_only_the_pickle_protocol_warning_of_torch_load_is_hidden(tmp_path, monkeypatch):
    """Garbage files make torch.load warn about their odd pickle protocol (hidden: the error says it);
    any other warning of torch.load reaches the caller."""
    import warnings

    p = str(tmp_path / "checkpoint.pt")
    C.atomic_torch_save(_valid(), p)
    real = torch.load

    def load_warning(message):
        def load(*a, **k):
            warnings.warn(message, UserWarning)
            return real(*a, **k)
        return load

    monkeypatch.setattr(torch, "load", load_warning("Detected pickle protocol 103 in the checkpoint, which was not"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        C.load_checkpoint(p)
    assert seen == []
    monkeypatch.setattr(torch, "load", load_warning("some other torch.load warning"))
    with pytest.warns(UserWarning, match="some other torch.load warning"):
        C.load_checkpoint(p)


def test_atomic_writes_fsync_the_file_then_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = record_fsync(monkeypatch)
    C.atomic_torch_save({"a": torch.zeros(1)}, str(tmp_path / "x.pt"))
    assert events == ["fsync file", "replace", "fsync dir"]
    events.clear()
    atomic.write_json(str(tmp_path / "x.json"), {"a": 1})
    assert events == ["fsync file", "replace", "fsync dir"]
    assert json.load(open(tmp_path / "x.json")) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["x.json", "x.pt"]


def test_a_write_that_fails_midway_keeps_the_old_file(tmp_path):
    p = str(tmp_path / "report.json")
    atomic.write_json(p, {"old": True})
    class Boom:
        def __str__(self):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_json(p, {"new": 1, "then": Boom()})  # fails while writing
    assert json.load(open(p)) == {"old": True}
    assert os.listdir(tmp_path) == ["report.json"]


def test_interrupt_between_temp_write_and_rename_keeps_the_old_checkpoint_and_no_temp_file(tmp_path):
    """Ctrl-C (KeyboardInterrupt) between the complete temporary file and the rename: the old checkpoint
    stays, the temporary file is removed, the interrupt goes on. (A SIGKILL there leaves the temporary
    file to the next start's remove_stale_temp: test_train_cli.)"""
    p = str(tmp_path / "checkpoint.pt")
    C.atomic_torch_save(_valid(state={"global_step": 4}), p)

    def interrupt():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        C.atomic_torch_save(_valid(state={"global_step": 6}), p, before_replace=interrupt)
    assert C.load_checkpoint(p)["state"]["global_step"] == 4
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_replace_dir_puts_the_old_folder_back_when_the_new_one_cannot_move_in(tmp_path, monkeypatch):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "config.json").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "config.json").write_text("new")
    real = os.replace

    def replace(a, b):
        if str(a).endswith("new"):
            raise OSError("no space left")
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="no space"):
        atomic.replace_dir(str(tmp_path / "new"), str(tmp_path / "best"))
    assert (tmp_path / "best" / "config.json").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["best", "new"]


def test_stale_temp_files_are_removed_and_displaced_folders_restored(tmp_path):
    keep = ["checkpoint.pt", "metrics.jsonl", "best", "notes.tmp", ".hidden"]
    for f in ("checkpoint.pt", "metrics.jsonl", "notes.tmp", ".hidden", ".checkpoint.pt.tmp.123",
              ".metrics.csv.tmp.9"):
        (tmp_path / f).write_text("x")
    for d in ("best", ".best.tmp.5", ".best.old.6", ".last.old.7"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text(d)
    removed = atomic.remove_stale_temp(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["last"])
    assert (tmp_path / "best" / "config.json").read_text() == "best"
    assert (tmp_path / "last" / "config.json").read_text() == ".last.old.7"  # the only full copy: put back
    assert sorted(removed) == [".best.old.6", ".best.tmp.5", ".checkpoint.pt.tmp.123", ".metrics.csv.tmp.9"]


def test_run_config_and_report_are_written_atomically(tmp_path, monkeypatch):
    pytest.importorskip("mnist")
    pytest.importorskip("transformers")
    from mmkernels.train import trainer
    from mmkernels.train.cli import train_main
    from train_fixtures import jsonl_overrides, write_digit_jsonl

    files = write_digit_jsonl(str(tmp_path / "data"), n_train=16, n_val=16, n_test=16)
    written = []

    def record(path, obj):
        written.append(os.path.basename(path))
        return atomic.write_json(path, obj)

    monkeypatch.setattr(trainer, "write_json", record)
    out = tmp_path / "run"
    assert train_main(jsonl_overrides(files, str(out), epochs=1, final_eval=True)) == 0
    assert written == ["run_config.json", "report.json"]
    assert json.load(open(out / "report.json"))["test"]["n"] == 16
    assert not [f for f in os.listdir(out) if f.startswith(".")]


def test_stale_temp_files_of_running_writers_can_be_kept(tmp_path):
    """only_dead_writers (a folder several processes write, e.g. the data cache): the temporary files
    of processes still running stay."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for f in (f".train.pt.tmp.{dead}", f".val.pt.tmp.{os.getpid()}", f".test.pt.tmp.{os.getppid()}"):
        (tmp_path / f).write_text("x")
    assert atomic.remove_stale_temp(str(tmp_path), only_dead_writers=True) == [f".train.pt.tmp.{dead}"]
    assert sorted(os.listdir(tmp_path)) == sorted([f".val.pt.tmp.{os.getpid()}", f".test.pt.tmp.{os.getppid()}"])
