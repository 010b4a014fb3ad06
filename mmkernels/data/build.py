"""Build the AV-MNIST-with-questions data set: `python -m mmkernels.data.build [--cache-dir D] ...`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields

from mmkernels.data.avmnist import AVMNISTConfig, build_avmnist, default_cache_dir
from mmkernels.data.speech import MissingPackageError


def main(argv=None):
    p = argparse.ArgumentParser(prog="mmkernels-build-data", description=__doc__)
    p.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()} (or $MMKERNELS_CACHE)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    for f in fields(AVMNISTConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        t = float if f.type in ("float", float) else int if f.type in ("int", int) else str
        p.add_argument(flag, type=t, default=f.default)
    a = p.parse_args(argv)
    t = time.time()
    try:
        cfg = AVMNISTConfig(**{f.name: getattr(a, f.name) for f in fields(AVMNISTConfig)})
        out = build_avmnist(cfg, cache_dir=a.cache_dir, force=a.force)
    except (MissingPackageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    print(json.dumps({"dir": out, "seconds": round(time.time() - t, 1),
                      "samples": {k: v["samples"] for k, v in meta["splits"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
