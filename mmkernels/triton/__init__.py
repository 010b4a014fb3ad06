"""Triton kernels of the mmkernels ops (imported lazily: importing mmkernels never imports triton)."""
from __future__ import annotations

from typing import List


def not_supported_reasons(call) -> List[str]:
    """Limits of the Triton kernels beyond the common GPU ones (see backends.py)."""
    return ["the Triton kernels are not written yet"]
