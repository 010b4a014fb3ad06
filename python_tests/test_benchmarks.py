"""The GPU benchmark script runs end to end on the CPU (--dry-run): a GPU session is
short, and a script that breaks after the build would waste it."""
import csv
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from mmkernels import backends

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(backends.triton_error() is not None, reason="triton is not installed")
def test_bench_gpu_dry_run_writes_every_entry(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--dry-run", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "=== mmkernels GPU benchmarks" in r.stdout
    assert (tmp_path / "bench_gpu.png").stat().st_size > 10_000  # the plot
    assert r.stdout.count("target:") == 5
    with open(tmp_path / "bench_gpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert (tmp_path / "bench_gpu.md").read_text().count("\n|") == len(rows) + 2  # header, rule, a line a row
    cases = {row["case"].split(" ")[0] for row in rows}
    assert cases == {"cross-modal", "gated-fusion", "one-seg", "left-padded"}
    for case in cases:
        ours = [row for row in rows if row["case"].startswith(case) and row["impl"] == "mmkernels-triton"]
        assert len(ours) == 1 and "FAILED" not in ours[0]["note"] and float(ours[0]["fwd_ms"]) > 0, ours
    # the baselines that exist on the CPU were timed, not just listed
    for impl, n in (("sdpa-flash", 3), ("flex-attention", 2)):  # flash: the prefill's causal floor too
        timed = [row for row in rows if row["impl"].startswith(impl) and row["fwd_ms"]]
        assert len(timed) == n, (impl, rows)


def _interleaved_median_ms():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from common import interleaved_median_ms
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return interleaved_median_ms


def test_interleaved_timing_runs_each_setup_untimed_before_its_variant():
    interleaved_median_ms = _interleaved_median_ms()
    log = []
    fns = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    before = {"a": lambda: (log.append("set a"), time.sleep(0.02)), "b": lambda: log.append("set b")}
    t = interleaved_median_ms(fns, reps=3, warmup=1, before=before)
    pairs = [tuple(log[i:i + 2]) for i in range(0, len(log), 2)]
    assert set(pairs) == {("set a", "a"), ("set b", "b")}  # each setup right before its own variant
    rounds = [sorted(p[1] for p in pairs[i:i + 2]) for i in range(0, len(pairs), 2)]
    assert rounds == [["a", "b"]] * 4  # one warmup round, three timed: every variant once a round
    assert t["a"] < 10  # the 20 ms setup is not in a's time


def test_interleaved_timing_lets_every_variant_follow_every_other():
    # A variant pays for what the one before it left (page faults for its frees, evicted caches): in a
    # fixed order the same variant always pays for the same neighbour.
    interleaved_median_ms = _interleaved_median_ms()
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in "abc"}
    interleaved_median_ms(fns, reps=60, warmup=0)
    follows = Counter(zip(log, log[1:]))
    for x in "abc":
        for y in "abc":
            if x != y:
                assert follows[(x, y)] >= 10, follows  # about 20 each in 60 rounds
    first = list(log)
    log.clear()
    interleaved_median_ms(fns, reps=60, warmup=0)
    assert log == first  # the order is seeded: a rerun times the variants in the same order
