import os

import torch

# Triton runs on CPU tensors only through its interpreter, which must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
