"""`python -m mmkernels.train.eval --model runs/quick/best` (same as mmkernels-eval)."""
import sys

from mmkernels.train.cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
