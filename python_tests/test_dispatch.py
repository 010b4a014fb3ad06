"""Dispatch: the default order, forced backends, and `python -m mmkernels.info`."""
import subprocess
import sys

import torch

from mmkernels import backends


def test_default_on_cpu_is_the_cpu_kernel_when_built_else_reference():
    call = backends.Call("cross_modal_attention", "cpu", torch.float32, 2, 64, 64)
    expected = "cpu" if not backends.not_supported_reasons("cpu", call) else "reference"
    assert backends.select(call) == expected


def test_gpu_backends_refuse_fp64_and_large_head_dims_with_reasons():
    call = backends.Call("cross_modal_attention", "cuda", torch.float64, 2, 512, 64)
    for name in ("cuda", "triton"):
        reasons = " ".join(backends.not_supported_reasons(name, call))
        assert "float64" in reasons or "triton is not installed" in reasons
    assert "head dims up to 256" in " ".join(backends.not_supported_reasons("cuda", call))


def test_reference_serves_everything():
    call = backends.Call("gated_fusion", "meta", torch.float64, 8)
    assert backends.not_supported_reasons("reference", call) == []
    assert backends.select(call) == "reference"


def test_info_prints_every_backend():
    out = subprocess.run([sys.executable, "-m", "mmkernels.info"], capture_output=True, text=True, check=True).stdout
    assert "extension mmkernels._C" in out
    for name in backends.BACKENDS:
        assert f"    {name}" in out
