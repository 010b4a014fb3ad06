"""Shared test helpers: random inputs of the ops and the tolerance rule of DESIGN.md 5."""
from __future__ import annotations

import os
import wave
import zlib

import numpy as np
import pytest
import torch

from mmkernels import backends

LOW_PRECISION = (torch.float16, torch.bfloat16)
# Floors of the tolerance rule, on O(1) values.
FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-10}


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def compiled_backends():
    """(backend, device) pairs of the compiled backends that can run here.

    On CI MMKERNELS_REQUIRE_EXT=1 turns a missing extension into a failure
    rather than a silent skip.
    """
    pairs = [("cpu", "cpu")]
    if torch.cuda.is_available():
        pairs.append(("cuda", "cuda"))
    return [pytest.param(b, d, id=b) for b, d in pairs]


def must_have(backend: str) -> bool:
    """Whether MMKERNELS_REQUIRE_EXT=1 makes `backend` mandatory here: the CPU kernels always,
    the CUDA kernels and Triton on a machine with a GPU (a GPU run must never skip them)."""
    if os.environ.get("MMKERNELS_REQUIRE_EXT") != "1":
        return False
    return backend == "cpu" or (backend in ("cuda", "triton") and torch.cuda.is_available())


def require_backend(backend: str, device: str, dtype=torch.float32, op="cross_modal_attention"):
    reasons = backends.not_supported_reasons(backend, backends.Call(op, device, dtype, 1, 64, 64))
    if reasons:
        # A dtype the backend does not run (fp64 on a GPU) skips; a backend that runs nothing fails.
        missing = backends.not_supported_reasons(backend, backends.Call(op, device, torch.float32, 1, 64, 64))
        if must_have(backend) and missing:
            pytest.fail(f"backend {backend} must be available here (MMKERNELS_REQUIRE_EXT=1): {missing}")
        pytest.skip(f"backend {backend} unavailable: {'; '.join(reasons)}")


def every_backend():
    """(backend, device) pairs of every backend that can run here, the reference included;
    Triton runs on CPU tensors under its interpreter where there is no GPU."""
    gpu = torch.cuda.is_available()
    pairs = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cuda" if gpu else "cpu")]
    if gpu:
        pairs.append(("cuda", "cuda"))
    return [pytest.param(b, d, id=b) for b, d in pairs]


def kernel_backends():
    """every_backend() without the reference: the kernels under test."""
    return [p for p in every_backend() if p.values[0] != "reference"]


def exact_dtype(device: str) -> torch.dtype:
    """The most exact dtype every compiled backend on `device` runs: fp64 on CPU, fp32 on GPUs."""
    return torch.float64 if device == "cpu" else torch.float32


def stable_seed(*parts) -> int:
    """A seed from test parameters that is the same in every process (hash() of a str is not)."""
    return zlib.crc32(repr(parts).encode()) % 2**31


def rand(*shape, dtype, device, noncontig=False, seed_gen=None):
    """Random normal tensor; noncontig gives a strided view (last dim contiguous)."""
    if not noncontig:
        return torch.randn(*shape, dtype=dtype, device=device)
    # Allocate a larger (.., 2*dim) buffer along dim 1 and a padded head dim, then slice.
    big = torch.randn(shape[0], 2 * shape[1] + 1, *shape[2:-1], shape[-1] + 3, dtype=dtype, device=device)
    return big[:, 1::2, ..., : shape[-1]]


def attention_inputs(B, Lq, Lks, Hq, Hkv, D, Dv, dtype, device, *, padded=True, q_pad=False,
                     bias=False, gate=False, noncontig=False, grad=False, gen_lengths=None):
    q = rand(B, Lq, Hq, D, dtype=dtype, device=device, noncontig=noncontig)
    keys = [rand(B, L, Hkv, D, dtype=dtype, device=device, noncontig=noncontig) for L in Lks]
    values = [rand(B, L, Hkv, Dv, dtype=dtype, device=device, noncontig=noncontig) for L in Lks]
    kw = {}
    if padded:
        kw["kv_lengths"] = torch.stack(
            [torch.randint(0, L + 1, (B,)) for L in Lks], dim=1
        ).to(device=device, dtype=torch.int32)
    if q_pad:
        kw["q_lengths"] = torch.randint(0, Lq + 1, (B,), device=device)
    if bias:
        kw["modality_bias"] = torch.randn(Hq, len(Lks), device=device, dtype=torch.float32)
    if gate:
        kw["head_gate"] = torch.randn(Hq, device=device, dtype=torch.float32)
    if grad:
        for t in [q, *keys, *values] + [kw[n] for n in ("modality_bias", "head_gate") if n in kw]:
            t.requires_grad_(True)
    return q, keys, values, kw


def assert_within_rule(out, ref64, ref_low, name="output", precision=None):
    """FlashAttention's rule: error vs fp64 <= 2x the low-precision reference's error + floor.

    `precision` is the dtype the value was computed in when it differs from its own (the
    fp32 gradient of an fp32 head_gate passes through fp16 activations): the floor is its."""
    assert not torch.isnan(out).any(), f"{name} has NaN"
    err = (out.double() - ref64.double()).abs().max().item() if out.numel() else 0.0
    base = (ref_low.double() - ref64.double()).abs().max().item() if out.numel() else 0.0
    floor = FLOOR[precision or out.dtype]
    assert err <= 2 * base + floor, f"{name}: max error {err:.3g} > 2 x {base:.3g} + {floor:g}"


def close(out, ref, dtype):
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref.to(out.dtype), atol=1e-9, rtol=1e-9)
    else:
        torch.testing.assert_close(out, ref.to(out.dtype), atol=2e-5, rtol=2e-4)


def attention_grads(out, lse, inputs, seed=0):
    """Grads of a random weighting of an attention output and of its finite lse entries."""
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
    gl = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(out.device)
    loss = (out.double() * go).sum() + (torch.where(lse.isfinite(), lse, 0).double() * gl).sum()
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def record_fsync(monkeypatch, names=False):
    """Which kinds of file descriptors are fsynced, in order with the renames ("replace", or
    ("replace", source name, target name) with names=True); the list fills as the code runs."""
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.basename(a), os.path.basename(b)) if names else "replace")
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def write_wav(path, x, sr=8000, channels=1, width=2):
    """x in [-1, 1] as a PCM WAV file of `width` bytes per sample (repeated over `channels`)."""
    x = np.repeat(np.asarray(x, np.float64)[:, None], channels, 1)
    scale = {1: 127, 2: 32767, 4: 2 ** 31 - 1}[width]
    data = np.clip(x, -1, 1) * scale
    data = (data + 128).astype(np.uint8) if width == 1 else data.astype({2: np.int16, 4: np.int32}[width])
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels), f.setsampwidth(width), f.setframerate(sr)
        f.writeframes(data.tobytes())
