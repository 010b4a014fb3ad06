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


def test_package_works_without_the_extension():
    """MMKERNELS_NO_EXT=1 stands for a pure-Python install: imports, dispatches to the reference."""
    code = (
        "import torch, mmkernels\n"
        "from mmkernels import backends\n"
        "assert backends.extension_error() == 'MMKERNELS_NO_EXT=1 is set'\n"
        "q = torch.randn(2, 3, 4, 8); k = [torch.randn(2, 5, 2, 8)]; v = [torch.randn(2, 5, 2, 8)]\n"
        "out = mmkernels.cross_modal_attention(q, k, v, kv_lengths=torch.tensor([[5], [0]]))\n"
        "assert out.shape == (2, 3, 4, 8) and torch.all(out[1] == 0)\n"
        "call = backends.Call('cross_modal_attention', 'cpu', torch.float32, 1, 8, 8)\n"
        "assert backends.select(call) == 'reference'\n"
        "print('ok')\n"
    )
    env = {**__import__("os").environ, "MMKERNELS_NO_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_require_ext_fails_missing_gpu_backends_on_a_gpu_machine(monkeypatch):
    """MMKERNELS_REQUIRE_EXT=1 on a machine with a GPU: a CUDA or Triton backend that cannot
    run fails its tests instead of skipping them; without a GPU only the CPU kernels are required."""
    import pytest

    import utils

    monkeypatch.setenv("MMKERNELS_REQUIRE_EXT", "1")
    unable = lambda name, call: [f"{name} cannot run (test)"]  # noqa: E731
    monkeypatch.setattr(backends, "not_supported_reasons", unable)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("cuda", "triton", "cpu"):
        with pytest.raises(pytest.fail.Exception, match="must be available"):
            utils.require_backend(name, "cuda" if name != "cpu" else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "triton"):
        with pytest.raises(pytest.skip.Exception):
            utils.require_backend(name, "cuda")
    with pytest.raises(pytest.fail.Exception):
        utils.require_backend("cpu", "cpu")
    # A dtype the backend does not run (fp64 on a GPU) is a skip, not a missing backend.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    no_fp64 = lambda name, call: ["no fp64"] if call.dtype == torch.float64 else []  # noqa: E731
    monkeypatch.setattr(backends, "not_supported_reasons", no_fp64)
    with pytest.raises(pytest.skip.Exception):
        utils.require_backend("cuda", "cuda", torch.float64)
    monkeypatch.setattr(backends, "not_supported_reasons", unable)
    monkeypatch.delenv("MMKERNELS_REQUIRE_EXT")
    with pytest.raises(pytest.skip.Exception):
        utils.require_backend("cpu", "cpu")


def test_selection_has_no_side_effects():
    """Asking whether Triton can serve a call imports no kernels (and not triton itself), and
    the Triton kernel modules import only torch and triton (no import circle through mmkernels)."""
    code = (
        "import os, sys, torch\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from mmkernels import backends\n"
        "for dev in ('cpu', 'cuda'):\n"
        "    backends.describe(backends.Call('cross_modal_attention', dev, torch.float32, 3, 64, 64))\n"
        "    backends.describe(backends.Call('gated_fusion', dev, torch.bfloat16, 3))\n"
        "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'mmkernels.triton'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr

    import ast
    import os

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mmkernels", "triton")
    for name in ("cross_modal_attention.py", "cross_modal_attention_kernels.py", "gated_fusion.py"):
        tree = ast.parse(open(os.path.join(here, name)).read())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "mmkernels" not in imported, (name, imported)
        # the host module imports its kernels (a sibling); the kernel modules import nothing of the package
        relative = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
        assert relative <= ({"cross_modal_attention_kernels"} if name == "cross_modal_attention.py" else set()), \
            (name, relative)
