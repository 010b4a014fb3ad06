"""Additive float masks, as other libraries pass them, read as the op's key masks (True = attend)."""
from __future__ import annotations

from typing import Optional

import torch


def attend_where_zero(mask: torch.Tensor, dtype_min_blocks: bool) -> Optional[torch.Tensor]:
    """`mask == 0` when every value of the float mask is 0 or blocks its key, else None. -inf blocks;
    with dtype_min_blocks so does the dtype's min, whose weight underflows to exactly 0 while every
    score is below half the dtype's range. (One device sync: the caller reads the answer.)"""
    attend = mask == 0
    blocked = mask == float("-inf")
    if dtype_min_blocks:
        blocked = blocked | (mask == torch.finfo(mask.dtype).min)
    return attend if bool((attend | blocked).all()) else None
