"""Registers, spills and stack of every CUDA kernel of csrc/cuda on sm_90, without a GPU.

Compiles each .cu file with nvcc -Xptxas -v (the flags setup.py uses) and prints
one line per kernel instantiation. A kernel that spills moves registers through
local memory: worth a look before the GPU time is spent.

    python benchmarks/cuda_resources.py [--arch 90] [--only-spills] [--file fwd]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")


def short_name(mangled: str) -> str:
    """Demangled name without namespaces and parameter lists: kernel<T, ...>."""
    try:
        text = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
    except OSError:
        return mangled
    text = text.replace("mmkernels::cuda::", "").replace("__nv_bfloat16", "bf16").replace("__half", "half")
    return re.sub(r"\(.*\)$", "", text.split(" ", 1)[-1] if text.startswith("void ") else text)


def ptxas_report(source: Path, arch: str, includes, defines):
    # C++20: what newer torch headers need; the sources compile as C++17 too (older torch)
    cmd = ["nvcc", "-std=c++20", "-c", "-o", os.devnull, f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "--expt-relaxed-constexpr", "-O3", "-Xptxas", "-v", *includes, *defines, str(source)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{r.stderr[-3000:]}")
    rows, current = [], None
    for line in r.stderr.splitlines():
        m = ENTRY.search(line)
        if m:
            current = {"kernel": short_name(m.group(1)), "file": source.name}
            continue
        if current is None:
            continue
        m = SPILL.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = USED.search(line)
        if m:
            current["regs"] = int(m.group(1))
            rows.append(current)
            current = None
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90")
    ap.add_argument("--only-spills", action="store_true")
    ap.add_argument("--file", action="append", default=None, metavar="NAME",
                    help="only the .cu files whose name contains NAME (repeatable)")
    args = ap.parse_args(argv)
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", "-Icsrc"]
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-DMMKERNELS_WITH_CUDA=1"]
    rows = []
    for source in sorted((REPO / "csrc" / "cuda").glob("*.cu")):
        if args.file and not any(name in source.name for name in args.file):
            continue
        print(f"compiling {source.relative_to(REPO)} for sm_{args.arch} ...", flush=True)
        rows += ptxas_report(source, args.arch, includes, defines)
    width = max(len(r["kernel"]) for r in rows)
    print(f"\n{'kernel':<{width}}  regs  stack  spill st  spill ld")
    spilling = 0
    for r in rows:
        spills = r.get("spill_st", 0) + r.get("spill_ld", 0)
        spilling += spills > 0
        if args.only_spills and not spills:
            continue
        print(f"{r['kernel']:<{width}}  {r['regs']:>4}  {r.get('stack', 0):>5}  {r.get('spill_st', 0):>8}  "
              f"{r.get('spill_ld', 0):>8}")
    print(f"\n{len(rows)} kernel instantiations, {spilling} with spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
