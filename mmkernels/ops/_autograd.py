"""Registration shared by the ops: the backends' load step, and autograd of the fused backward kernels."""
from __future__ import annotations

from typing import Callable, Dict

import torch

# Each op's `register(fwd_name, bwd_name)` (fake kernels + autograd), by op name. The op modules
# fill it at import; the triton load step (_load_triton.py) applies it to the Triton ops without
# importing the op modules, so there is no import circle.
REGISTER: Dict[str, Callable[[str, str], None]] = {}


def forbid_double_backward(bwd_name: str, op: str) -> None:
    """The fused backward ops have no derivative of their own. Without an autograd kernel,
    a second-order gradient through them (create_graph=True, gradient penalties) would come
    out silently as if they were constants: make it an error that says what to do instead."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"mmkernels.{op} has no second derivative (double backward through mmkernels::{bwd_name}); "
            f"for higher-order gradients run it with backend='reference'"
        )

    torch.library.register_autograd(f"mmkernels::{bwd_name}", backward, setup_context=lambda ctx, inputs, output: None)
