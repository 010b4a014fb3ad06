"""Timing, memory and report helpers shared by the benchmark scripts."""
from __future__ import annotations

import csv
import gc
import os
import random
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"


KEEP_HEAP_HELP = ("glibc keeps its heap (no trimming, no mmap for large blocks): no variant pays page faults for "
                  "another's frees (see common.keep_heap)")


def keep_heap() -> bool:
    """Stops glibc from trimming its heap and from serving large blocks by mmap (mallopt), so that no
    variant pays page faults for memory another variant's frees handed back to the kernel. With the
    defaults, which variant pays them depends on the order of frees: on a small BERT encoder it moved
    the faults of the layer after the attention from one attn_implementation to another. Returns
    False where there is no glibc (mallopt's own answer is 1 for any call, so it is not checked)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    libc.mallopt(m_mmap_threshold, 32 << 20)
    return True


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], reps: int = 15, warmup: int = 3, device: str = "cpu") -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_median_ms(fns: Dict[str, Callable[[], object]], reps: int = 15, warmup: int = 2,
                          device: str = "cpu", before: Optional[Dict[str, Callable[[], object]]] = None
                          ) -> Dict[str, float]:
    """Median ms of each fn, timed round-robin: the machine's drifts (a noisy VM,
    clock changes) hit every variant alike, so their ratios stay meaningful. Each
    round runs the variants in a new (seeded) order: a variant pays for what the one
    before it left behind (page faults for its frees, evicted caches), and in a fixed
    order one variant would always pay for the same neighbour (the heap trimmed after the
    eager attention's large frees faults in the next variant's memory; see keep_heap).
    before[name], where given, runs untimed ahead of each call of fns[name]."""
    before = before or {}
    for _ in range(warmup):
        for name, fn in fns.items():
            if name in before:
                before[name]()
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)
        for name in order:
            fn = fns[name]
            if name in before:
                before[name]()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_gflops(n: int = 2048, dtype=torch.float32, device: str = "cpu", reps: int = 7) -> float:
    """Rate of a large square matrix product: the machine's yardstick in the same run."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    ms = median_ms(lambda: a @ b, reps=reps, warmup=2, device=device)
    return 2 * n**3 / (ms * 1e-3) / 1e9


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_cpu_memory_bytes(fn: Callable[[], object]) -> int | None:
    """Peak resident memory that fn() adds, beyond what was resident before it.

    Resets the kernel's high-water mark (clear_refs 5) and reads VmHWM after the
    call; returns None where that is not possible (not Linux, no permission).
    The result of fn is kept alive until the reading, so outputs count too:
    callers subtract the output size.
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _read_status("VmRSS")
        out = fn()
        peak = _read_status("VmHWM")
    except OSError:
        return None
    del out
    return max(peak - before, 0)


def write_report(name: str, rows: List[Dict], columns: List[str], title: str, notes: List[str]) -> Path:
    """CSV + markdown table under benchmarks/results/; returns the markdown path."""
    out_dir = Path(os.environ.get("MMKERNELS_BENCH_DIR", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [f"## {title}", ""] + [f"- {n}" for n in notes] + [""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def bar_plot(name: str, labels: List[str], values: List[float], ylabel: str, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out_dir = Path(os.environ.get("MMKERNELS_BENCH_DIR", RESULTS))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4))
    ax.bar(range(len(values)), values, color="#4477aa")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
