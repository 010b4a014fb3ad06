import os

import torch
from hypothesis import HealthCheck, settings

# Triton runs on CPU tensors only through its interpreter, which must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Property tests: the same examples on every run (CI time stays predictable, a failure
# reproduces anywhere), no deadline (the first call of a kernel compiles), and the
# falsifying example printed with the blob that replays it (@reproduce_failure).
# HYPOTHESIS_PROFILE=explore draws new examples instead.
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("mmkernels", derandomize=True, **_COMMON)
settings.register_profile("explore", derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mmkernels"))
