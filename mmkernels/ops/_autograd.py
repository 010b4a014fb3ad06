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


def _flatten(args):
    """The ops' arguments (and gradients) as one flat tuple, and what _unflatten needs to rebuild them:
    each argument is a tensor, None or a scalar, or a list of those (one per segment). Written out
    because torch.utils._pytree's general walk cost about 50 us a call, forward and backward, at
    the small shapes where the kernels themselves take tens of microseconds."""
    flat, spec = [], []
    for a in args:
        if isinstance(a, (list, tuple)):
            flat.extend(a)
            spec.append(len(a))
        else:
            flat.append(a)
            spec.append(-1)
    return tuple(flat), tuple(spec)


def _unflatten(flat, spec):
    args, i = [], 0
    for n in spec:
        if n < 0:
            args.append(flat[i])
            i += 1
        else:
            args.append(list(flat[i:i + n]))
            i += n
    return tuple(args)


class _EagerFused(torch.autograd.Function):
    """A registered op and its registered autograd formula (setup_context, backward) under a plain
    torch.autograd.Function, over the op's inputs flattened (lists of tensors become arguments)."""

    @staticmethod
    def forward(ctx, spec, *flat):
        op, setup_context, backward, arg_spec = spec
        inputs = _unflatten(flat, arg_spec)
        with torch._C._AutoDispatchBelowAutograd():  # the op's own autograd wrapper is what this replaces
            output = op(*inputs)
        setup_context(ctx, inputs, output)
        ctx.eager_spec = spec
        return output

    @staticmethod
    def backward(ctx, *grads):
        backward = ctx.eager_spec[2]
        if torch.is_grad_enabled():  # create_graph: the fused backward ops' own wrapper refuses it
            formula_grads = backward(ctx, *grads)
        else:
            with torch._C._AutoDispatchBelowAutograd():  # nothing to record: skip the wrapper (10-20 us)
                formula_grads = backward(ctx, *grads)
        flat, _ = _flatten(formula_grads)
        return (None, *flat)


# tensors and parameters; not the subclasses of tracing (fake or functional tensors) or of users
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def fast_paths_available(torch_c=torch._C) -> bool:
    """Whether this torch has the private pieces the fast paths stand on. Where one is missing (another
    torch version), every call takes the registered op and its dispatcher autograd: slower, the same
    kernels and formula."""
    return all(callable(getattr(torch_c, name, None))
               for name in ("_AutoDispatchBelowAutograd", "_are_functorch_transforms_active"))


FAST_PATHS = fast_paths_available()


def eager_autograd_applies(*tensors) -> bool:
    """True in plain eager autograd: grad mode on, an input that requires grad, plain tensors (or parameters), no
    torch.compile / export tracing, no functorch transform. There the registered op runs under a
    torch.autograd.Function (about 10 us a call) instead of the dispatcher's autograd wrapper of a
    torch.library op (about 50 us): the same kernels and formula, the gradients bit for bit."""
    if not torch.is_grad_enabled() or not _plain_eager():
        return False
    return any(t.requires_grad for t in tensors) and all(type(t) in _PLAIN_TENSORS for t in tensors)


# fwd op name -> (setup_context, backward): the formula registered for it, for the eager path
_FORMULAS: Dict[str, tuple] = {}


def register_autograd(fwd_name: str, backward, setup_context) -> None:
    """torch.library.register_autograd for mmkernels::fwd_name, the formula also kept for run_fwd."""
    _FORMULAS[fwd_name] = (setup_context, backward)
    torch.library.register_autograd(f"mmkernels::{fwd_name}", backward, setup_context=setup_context)


def run_fwd(fwd_name: str, inputs: tuple, differentiable):
    """torch.ops.mmkernels.<fwd_name>(*inputs): under _EagerFused where eager_autograd_applies to the
    `differentiable` tensors; in plain eager with nothing to differentiate (inference, no_grad), below
    the dispatcher's autograd wrapper, which would only hand the call on (about 10 us); else the
    registered op (and its dispatcher autograd: torch.compile, export, functorch, subclasses needing grad)."""
    op = getattr(torch.ops.mmkernels, fwd_name)
    if eager_autograd_applies(*differentiable):
        setup_context, backward = _FORMULAS[fwd_name]
        flat, arg_spec = _flatten(inputs)
        return _EagerFused.apply((op, setup_context, backward, arg_spec), *flat)
    if _plain_eager_without_grad(differentiable):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*inputs)
    return op(*inputs)


def _plain_eager() -> bool:
    """This torch has the fast paths' pieces, and the call is eager: no torch.compile / export tracing,
    no functorch transform."""
    return FAST_PATHS and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def _plain_eager_without_grad(differentiable) -> bool:
    """Eager, outside functorch, and nothing to differentiate. Tensor subclasses and dispatch modes (fake
    tensors among them) still see the call: their Python dispatch key lies below autograd."""
    if not _plain_eager():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in differentiable))
