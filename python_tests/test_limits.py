"""The contract's limits are declared once per language and agree: mmkernels/backends.py for
dispatch, csrc/common/limits.h for the C++/CUDA kernels, the Triton kernels' segment slots."""
import os
import re

import pytest
import torch

from mmkernels import backends
from utils import require_backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpp_limits():
    text = open(os.path.join(REPO, "csrc", "common", "limits.h")).read()
    return {name: int(value) for name, value in re.findall(r"constexpr int (k\w+) = (\d+);", text)}


def test_python_and_cpp_limits_agree():
    cpp = _cpp_limits()
    assert cpp["kMaxSegments"] == backends.MAX_SEGMENTS
    assert cpp["kMaxGpuHeadDim"] == backends.MAX_GPU_HEAD_DIM
    major, minor = backends.REGISTRY["cuda"].min_capability
    assert cpp["kMinCudaCapability"] == 10 * major + minor
    for name in ("cuda", "triton"):
        assert backends.REGISTRY[name].max_head_dim == backends.MAX_GPU_HEAD_DIM
    assert all(b.max_segments == backends.MAX_SEGMENTS for b in backends.REGISTRY.values())


def test_no_other_copy_of_the_limits_in_the_cpp_sources():
    """The C++ and CUDA sources use the header's names, not their own numbers."""
    for folder in ("cpu", "cuda"):
        for root, _, files in os.walk(os.path.join(REPO, "csrc", folder)):
            for f in files:
                text = open(os.path.join(root, f)).read()
                assert not re.search(r"constexpr int kMaxSegments\s*=", text), f
                assert "<= 256 &&" not in text, f


def test_triton_segment_slots_match():
    pytest.importorskip("triton")
    from mmkernels.triton import _codegen

    assert _codegen.S == backends.MAX_SEGMENTS
    text = open(os.path.join(REPO, "mmkernels", "triton", "cross_modal_attention_kernels.py.in")).read()
    assert re.search(r"^MAX_SEGMENTS = (\d+)$", text, re.M).group(1) == str(backends.MAX_SEGMENTS)


def test_cpu_kernel_refuses_more_segments_than_the_limit():
    """The compiled kernel enforces the header's limit itself (the raw op, no Python checks)."""
    require_backend("cpu", "cpu")
    M = backends.MAX_SEGMENTS + 1
    q = torch.randn(1, 2, 1, 4)
    keys = [torch.randn(1, 3, 1, 4) for _ in range(M)]
    with pytest.raises(RuntimeError, match=f"expected 1 to {backends.MAX_SEGMENTS} segments, got {M}"):
        torch.ops.mmkernels.cross_modal_attention_fwd(q, keys, keys, None, None, None, None, 0.5, False)
    ok = torch.ops.mmkernels.cross_modal_attention_fwd(q, keys[:-1], keys[:-1], None, None, None, None, 0.5, False)
    assert ok[0].shape == (1, 2, 1, 4)


def test_backends_declare_their_limits():
    for name, backend in backends.REGISTRY.items():
        limits = backend.limits()
        assert backend.name == name and set(limits) >= {"devices", "dtypes", "max_head_dim", "max_segments"}
    assert backends.REGISTRY["cpu"].max_head_dim is None        # any head dim on CPU
    assert torch.float64 in backends.REGISTRY["cpu"].dtypes
    assert torch.float64 not in backends.REGISTRY["triton"].dtypes
