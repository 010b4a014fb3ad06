"""The run folder (train.output_dir): made, and cleared of what a killed run was writing; its metrics
log, metrics.jsonl (a row appended per log interval and evaluation) and metrics.csv (rewritten whole,
atomically); the learning-curve plot."""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import List, Optional

from mmkernels.train.config import ConfigError
from mmkernels.utils.atomic import atomic_write, remove_stale_temp

METRICS_JSONL, METRICS_CSV = "metrics.jsonl", "metrics.csv"


def make_run_folder(out: str, main: bool) -> None:
    """`out`, made if need be; the first process removes the temporary files a killed run left there
    (its complete files are in place)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"train.output_dir {out} is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # a parent is a file, no permission, read-only file system...
        raise ConfigError(f"train.output_dir {out} cannot be made: {e.strerror or e}") from e
    if main:
        remove_stale_temp(out)


def remove_logs(out: str) -> None:
    """A fresh run starts a fresh log."""
    for f in (METRICS_JSONL, METRICS_CSV):
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))


def append_row(out: str, row: dict) -> None:
    with open(os.path.join(out, METRICS_JSONL), "a") as f:
        f.write(json.dumps(row) + "\n")


def rewrite_jsonl(out: str, rows: List[dict]) -> None:
    """metrics.jsonl as `rows` (a resumed run: the log as of its checkpoint)."""
    atomic_write(os.path.join(out, METRICS_JSONL), lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows)),
                 mode="w")


def write_csv(out: str, rows: List[dict]) -> None:
    keys = sorted({k for r in rows for k in r if not isinstance(r[k], dict)})

    def write(f):
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)

    atomic_write(os.path.join(out, METRICS_CSV), write, mode="w")


def plot_learning_curves(out: str, rows: List[dict]) -> Optional[str]:
    """out/learning_curves.png: loss and accuracy of train and val by step (None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no learning-curve plot", file=sys.stderr)
        return None
    tr = [r for r in rows if r.get("split") == "train"]
    va = [r for r in rows if r.get("split") == "val"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train")
    ax[0].plot([r["step"] for r in va], [r["loss"] for r in va], "o-", label="val")
    ax[0].set_xlabel("step"); ax[0].set_ylabel("loss"); ax[0].set_yscale("log"); ax[0].legend()
    ax[1].plot([r["step"] for r in tr], [r["accuracy"] for r in tr], label="train (running)")
    ax[1].plot([r["step"] for r in va], [r["accuracy"] for r in va], "o-", label="val")
    ax[1].set_xlabel("step"); ax[1].set_ylabel("accuracy"); ax[1].legend()
    fig.tight_layout()
    p = os.path.join(out, "learning_curves.png")
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p
