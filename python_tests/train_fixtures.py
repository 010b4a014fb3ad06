"""Test fixtures of the training tests: tiny configurations (tiny data set, tiny model, CPU), an easy data
set as JSON lines, a counter of the reads of tensor values back to the host."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from typing import List, NamedTuple

import mmkernels

TINY_DATA = ["data.n_train=64", "data.n_val=32", "data.n_test=32", "data.speakers_train=3", "data.speakers_val=2",
             "data.speakers_test=2", "data.images_train=300", "data.images_val=100", "data.images_test=100"]
TINY_MODEL = ["model.d_model=32", "model.num_heads=2", "model.text_hidden=32", "model.text_layers=1",
              "model.text_heads=2", "model.image_channels=8", "model.audio_layers=1", "model.gmu_hidden=32",
              "model.dropout=0.1", "model.aux_digit_loss=0.5"]


# train settings of both kinds of test runs (tiny_overrides, jsonl_overrides): short, quiet, one thread
TINY_TRAIN = {"batch_size": 16, "epochs": 2, "lr": 1e-3, "warmup_steps": 2, "log_every": 2, "progress": False,
              "plot": False, "final_eval": False, "num_threads": 1}


def tiny_overrides(cache_dir: str, output_dir: str, **train) -> List[str]:
    """Tiny AV-MNIST, tiny model, CPU settings; `train`: train settings that replace these."""
    t = {**TINY_TRAIN, "ckpt_every": 3, "eval_batch_size": 32, "output_dir": output_dir, **train}
    return TINY_DATA + TINY_MODEL + [f"data.cache_dir={cache_dir}"] + [f"train.{k}={v}" for k, v in t.items()]


class HostRead(NamedTuple):
    method: str
    where: str
    stack: frozenset


READ_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


_PKG = os.path.dirname(os.path.abspath(mmkernels.__file__))
# the trainer, the model, its attention / fusion blocks and the ops they call
FORWARD_PATH = tuple(os.path.join(_PKG, d) + os.sep for d in ("train", "models", "nn", "ops"))
# the ops' argument checks read values on the CPU only (never a device sync), by design
CPU_ONLY_CHECKS = (os.path.join(_PKG, "ops", "_checks.py"),)


@contextlib.contextmanager
def count_host_reads(where=FORWARD_PATH, skip=CPU_ONLY_CHECKS):
    """Every read of a tensor's values back to the host (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`,
    `float(t)`, `int(t)`, `bool(t)`, ...) made from Python inside the block by code in the folders
    `where` (default: trainer, model, mmkernels/nn and mmkernels/ops; None: anywhere), except the files
    `skip`: on an accelerator each is a device sync. Yields a list of HostRead (method, caller
    file:line, names of the functions on the stack). Reads inside C++ ops are not seen."""
    import torch

    reads = []
    saved = {m: getattr(torch.Tensor, m) for m in READ_METHODS}

    def wrap(name, fn):
        def read(self, *a, **k):
            f = sys._getframe(1)
            caller = f.f_code.co_filename
            if (where is None or caller.startswith(tuple(where))) and caller not in tuple(skip or ()):
                stack, g = set(), f
                while g is not None:
                    stack.add(g.f_code.co_name)
                    g = g.f_back
                reads.append(HostRead(name, f"{f.f_code.co_filename}:{f.f_lineno}", frozenset(stack)))
            return fn(self, *a, **k)
        return read

    for m, fn in saved.items():
        setattr(torch.Tensor, m, wrap(m, fn))
    try:
        yield reads
    finally:
        for m, fn in saved.items():
            setattr(torch.Tensor, m, fn)


def write_digit_jsonl(folder: str, n_train: int = 128, n_val: int = 32, n_test: int = 64,
                      digits=(0, 1), seed: int = 0) -> dict:
    """An easy data set as JSON lines (data.dataset=jsonl): an MNIST image of one of `digits`, a fixed
    question, a short noise WAV; the label is the written digit's word. Returns split -> file path."""
    import wave

    import numpy as np
    from PIL import Image

    from mmkernels.data.avmnist import load_mnist

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    (x, y), _, _ = load_mnist()
    rng = np.random.default_rng(seed)
    pool = rng.permutation(np.flatnonzero(np.isin(y, digits)))
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    with wave.open(os.path.join(folder, "noise.wav"), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(8000)
        f.writeframes((rng.uniform(-0.1, 0.1, 4000) * 32767).astype(np.int16).tobytes())
    files, start = {}, 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        lines = []
        for i in pool[start:start + n]:
            Image.fromarray(x[i]).save(os.path.join(folder, "img", f"{i}.png"))
            lines.append(json.dumps({"text": "which digit is written?", "image": f"img/{i}.png",
                                     "audio": "noise.wav", "label": words[int(y[i])]}) + "\n")
        start += n
        files[split] = os.path.join(folder, f"{split}.jsonl")
        with open(files[split], "w") as f:
            f.write("".join(lines))
    return files


def jsonl_overrides(files: dict, output_dir: str, **train) -> List[str]:
    """Tiny model and CPU settings on the JSON lines files of write_digit_jsonl."""
    t = {**TINY_TRAIN, "eval_batch_size": 64, "output_dir": output_dir, **train}
    return ["data.dataset=jsonl", "model.task=classification", "model.aux_digit_loss=0.0"] + \
        [f"data.{s}_file={p}" for s, p in files.items()] + \
        [o for o in TINY_MODEL if not o.startswith("model.aux")] + [f"train.{k}={v}" for k, v in t.items()]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, env=None, module="mmkernels.train"):
    """A CLI of the package in a fresh process (one thread), from the repository root."""
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", module] + args, cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=600)
