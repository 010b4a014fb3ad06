"""Argument checks shared by the ops: each error names the argument and what was expected."""
from __future__ import annotations

from typing import Sequence

import torch

_INT_DTYPES = (torch.int32, torch.int64)


def check_dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")


def check_same_device(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected the device of the other inputs ({like.device})")


def _values_checkable(t: torch.Tensor) -> bool:
    # Reading values needs a host sync on a GPU and is impossible while tracing:
    # check them where they are free (CPU, eager); kernels clamp elsewhere.
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_lengths(name: str, lengths, shape, maxima: Sequence[int], like: torch.Tensor) -> None:
    """`lengths` int32/int64 of `shape`, column j within [0, maxima[j]]."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be an int32 or int64 tensor of shape {tuple(shape)}, got {type(lengths).__name__}")
    if lengths.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must have dtype int32 or int64, got {lengths.dtype}")
    if tuple(lengths.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(lengths.shape)}")
    check_same_device(name, lengths, like)
    if lengths.numel() and _values_checkable(lengths):
        if lengths.numel() <= 4096:  # a handful of values: read them once, cheaper than four tensor ops
            flat, cols = lengths.reshape(-1).tolist(), len(maxima)
            # each column's min and max (builtins over a list slice); a Python loop over every value
            # cost about 0.2 us a value, 13 us a call at batch 64, so it only names a bad one
            if all(min(flat[j::cols]) >= 0 and max(flat[j::cols]) <= hi for j, hi in enumerate(maxima)):
                return
            for pos, n in enumerate(flat):
                i, j = divmod(pos, cols)
                if not 0 <= n <= maxima[j]:
                    idx = [i, j] if lengths.dim() > 1 else [i]
                    raise ValueError(f"{name}{idx} = {n} is out of range [0, {maxima[j]}]")
            return
        upper = torch.tensor(maxima, dtype=lengths.dtype)
        bad = (lengths < 0) | (lengths > upper)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            col = idx[-1] if len(idx) > 1 else 0
            raise ValueError(
                f"{name}{list(idx)} = {int(lengths[idx])} is out of range [0, {maxima[col]}]"
            )
