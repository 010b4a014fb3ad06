import sys

from mmkernels.train.cli import train_main

sys.exit(train_main())
