"""Training checkpoints: plain data only (tensors, dicts, lists, numbers, strings), written atomically and
loaded with `torch.load(weights_only=True)`, so a crafted file cannot run code; RNG states as tensors and
lists; what in a checkpoint must match the run that resumes it, and the loading of its states into that run."""
from __future__ import annotations

import os
import random
import re
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from mmkernels.utils.atomic import atomic_write

CKPT_NAME = "checkpoint.pt"
CKPT_FORMAT = 2  # 2: plain data (weights_only); 1 held numpy objects
REQUIRED = ("format", "model", "optimizer", "scheduler", "rng", "state", "config")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the run resuming it."""


def atomic_torch_save(obj, path: str, before_replace: Optional[Callable[[], None]] = None) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), before_replace=before_replace)


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about the odd pickle protocol of a garbage file
            warnings.filterwarnings("ignore", message=r"Detected pickle protocol", category=UserWarning)
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        if "Weights only load failed" in msg:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
            raise CheckpointError(
                f"refused: {path} holds objects other than tensors and plain data"
                f" ({found.group(1) if found else 'not loadable with weights_only'}); loading it could run code."
                " A checkpoint of format 1 (older mmkernels) cannot be resumed: start a new run") from e
        raise CheckpointError(f"corrupt checkpoint {path}: cannot be read ({_first_line(e)})") from e
    missing = [k for k in REQUIRED if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise CheckpointError(f"corrupt checkpoint {path}: missing {missing}")
    if ck["format"] != CKPT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {ck['format']}, this version reads {CKPT_FORMAT}")
    return ck


# ----------------------------------------------------------------------------- RNG: seed, states as plain data
def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
          "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                     "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------- fit to the resuming run
# train settings that decide the batches (sample order, split) or the learning rate of every step: an exact
# resume needs the checkpoint's (the optimizer state would otherwise silently keep its lr and weight decay)
EXACT_RESUME_TRAIN_KEYS = ("batch_size", "seed", "epochs", "max_steps", "warmup_steps", "min_lr_ratio", "lr",
                           "text_lr", "weight_decay")


def config_changes(old: Dict, new: Dict, section: str = "model", keys: Optional[Sequence[str]] = None) -> List[str]:
    """`section.key: old -> new` for every key of `section` that differs (labels and the encoder config
    that save_pretrained fills in are left out); with `keys`, for those keys only."""
    a, b = old.get(section, {}) or {}, new.get(section, {}) or {}
    skip = {"labels", "num_labels", "bert_config"}
    names = sorted(set(a) | set(b)) if keys is None else sorted(keys)
    return [f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in names
            if k not in skip and a.get(k) != b.get(k)]


def does_not_fit(path: str, what: str, ck_config: Dict, config: Dict, detail: str = "", section: str = "model",
                 keys: Optional[Sequence[str]] = None) -> CheckpointError:
    changes = config_changes(ck_config, config, section, keys)
    why = "; ".join(changes) if changes else detail
    return CheckpointError(f"checkpoint {path}: its {what} does not fit this run ({why}): resume with the "
                           f"checkpoint's {section} settings, or start a new run in another train.output_dir")


def check_fits(ck: dict, path: str, world: int, labels: Sequence[str], config: Dict) -> None:
    """Refuses a checkpoint that another number of processes wrote (per-process RNG states and sample
    split: exact only with as many), trained with other labels, or with other train settings of the
    batches and learning rates (EXACT_RESUME_TRAIN_KEYS)."""
    ck_world = int(ck.get("world_size", 1))
    if ck_world != world:
        how = ("python -m mmkernels.train, without torchrun" if ck_world == 1 else
               f"python -m torch.distributed.run --nproc_per_node {ck_world} -m mmkernels.train ...")
        raise CheckpointError(f"checkpoint {path} was written by {ck_world} processes, this run has "
                              f"{world}: resume it with {ck_world} ({how}), or start a new run in "
                              "another train.output_dir")
    ck_labels = ck["config"].get("model", {}).get("labels")
    if ck_labels is not None and list(ck_labels) != list(labels):
        raise CheckpointError(f"checkpoint {path} was trained with labels {ck_labels}, this run has "
                              f"{labels} (did the train file change?)")
    if config_changes(ck["config"], config, "train", EXACT_RESUME_TRAIN_KEYS):
        raise does_not_fit(path, "data order or learning-rate schedule", ck["config"], config, section="train",
                           keys=EXACT_RESUME_TRAIN_KEYS)


def load_training_state(ck: dict, path: str, config: Dict, model: torch.nn.Module, optimizer, scheduler, scaler,
                        trainable: List[str]) -> None:
    """The model, optimizer, scheduler and scaler states of `ck` into the run's; `trainable`: the names
    of the run's trained parameters. What does not fit is named (does_not_fit)."""
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise does_not_fit(path, "model", ck["config"], config, "other parameter names or shapes") from e
    if "trainable" in ck and list(ck["trainable"]) != trainable:
        n = len(set(ck["trainable"]) ^ set(trainable))
        raise does_not_fit(path, "optimizer", ck["config"], config, f"{n} parameters trained in one and not the other")
    try:
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck.get("scaler", {}))
    except (ValueError, KeyError, RuntimeError) as e:
        raise does_not_fit(path, "optimizer", ck["config"], config, "other parameter groups") from e
