"""`python -m mmkernels.train.predict --model DIR --image x.png --audio x.wav -q "..."` (same as mmkernels-predict)."""
import sys

from mmkernels.train.cli import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
