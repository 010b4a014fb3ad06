"""gated_fusion: compiled backends against the reference, and the reference against the GMU."""
import pytest
import torch

import mmkernels
from mmkernels.reference import gated_fusion_reference as reference
from utils import LOW_PRECISION, assert_within_rule, close, compiled_backends, require_backend

SHAPES = [(2, (7,), 5), (3, (4, 33), 16), (4, (1,), 1000), (1, (127,), 3)]


def _inputs(M, lead, H, dtype, device, present=True, grad=True):
    f = torch.randn(M, *lead, H, dtype=dtype, device=device) * 2
    lg = torch.randn(M, *lead, H, dtype=dtype, device=device) * 2
    p = None
    if present:
        p = torch.rand(M, *lead, device=device) > 0.3
        p.view(M, -1)[:, 0] = False  # one position with no modality at all
    if grad:
        f.requires_grad_(True)
        lg.requires_grad_(True)
    return f, lg, p


def test_reference_is_the_gated_multimodal_unit():
    """M = 2 with the second logit 0: z = sigmoid(l), h = z tanh(a) + (1 - z) tanh(b)."""
    torch.manual_seed(0)
    a, b, l = torch.randn(3, 10, 6, dtype=torch.float64)
    fused = reference(torch.stack([a, b]), torch.stack([l, torch.zeros_like(l)]))
    z = torch.sigmoid(l)
    torch.testing.assert_close(fused, z * torch.tanh(a) + (1 - z) * torch.tanh(b))


def test_reference_absent_modalities():
    f = torch.randn(3, 4, 5, dtype=torch.float64)
    lg = torch.randn(3, 4, 5, dtype=torch.float64)
    present = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    fused, gates = reference(f, lg, present, return_gates=True)
    torch.testing.assert_close(fused[0], torch.tanh(f[0, 0]))  # only modality 0 present
    assert torch.all(fused[1] == 0) and torch.all(gates[:, 1] == 0)
    torch.testing.assert_close(gates.sum(0)[[0, 2, 3]], torch.ones(3, 5, dtype=torch.float64))


@pytest.mark.parametrize("backend,device", compiled_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["tanh", "identity"])
@pytest.mark.parametrize("with_present", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, device, dtype, activation, with_present, shape):
    require_backend(backend, device, dtype, op="gated_fusion")
    if dtype == torch.float64 and device == "cuda":
        pytest.skip("fp64 runs on cpu and reference only")
    torch.manual_seed(1)
    M, lead, H = shape
    f, lg, p = _inputs(M, lead, H, dtype, device, with_present)
    fused, gates = mmkernels.gated_fusion(f, lg, p, activation, return_gates=True, backend=backend)
    fused_ref, gates_ref = reference(f, lg, p, activation, return_gates=True)
    close(fused, fused_ref, dtype)
    close(gates, gates_ref, dtype)
    g1, g2 = torch.randn_like(fused), torch.randn_like(gates)
    loss = (fused * g1).sum() + (gates * g2).sum()
    loss_ref = (fused_ref * g1).sum() + (gates_ref * g2).sum()
    for a, b in zip(torch.autograd.grad(loss, [f, lg]), torch.autograd.grad(loss_ref, [f, lg])):
        close(a, b, dtype)
    # Without return_gates the kernels take the other (no gates written) path.
    out = mmkernels.gated_fusion(f, lg, p, activation, backend=backend)
    close(out, fused_ref, dtype)


@pytest.mark.parametrize("backend,device", compiled_backends())
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("activation", ["tanh", "identity"])
def test_low_precision_within_rule(backend, device, dtype, activation):
    require_backend(backend, device, dtype, op="gated_fusion")
    torch.manual_seed(2)
    f, lg, p = _inputs(3, (64,), 96, torch.float64, device)
    flo, llo = f.detach().to(dtype).requires_grad_(), lg.detach().to(dtype).requires_grad_()
    ref64 = reference(f, lg, p, activation)
    out = mmkernels.gated_fusion(flo, llo, p, activation, backend=backend)
    ref_low = reference(flo, llo, p, activation, upcast=False)
    assert_within_rule(out, ref64, ref_low)
    go = torch.randn_like(ref64)
    g64 = torch.autograd.grad(ref64, [f, lg], go)
    g = torch.autograd.grad(out, [flo, llo], go.to(dtype))
    glow = torch.autograd.grad(ref_low, [flo, llo], go.to(dtype))
    for a, b, c in zip(g, g64, glow):
        assert_within_rule(a, b, c, "grad")


@pytest.mark.parametrize("backend,device", compiled_backends())
def test_no_modality_present_gives_zero_not_nan(backend, device):
    require_backend(backend, device, op="gated_fusion")
    f, lg, _ = _inputs(3, (5,), 8, torch.float32, device)
    p = torch.zeros(3, 5, dtype=torch.bool, device=device)
    out = mmkernels.gated_fusion(f, lg, p, backend=backend)
    assert torch.all(out == 0)
    gf, gl = torch.autograd.grad(out.sum(), [f, lg])
    assert torch.all(gf == 0) and torch.all(gl == 0)


@pytest.mark.parametrize("backend,device", compiled_backends())
def test_noncontiguous_and_empty(backend, device):
    require_backend(backend, device, op="gated_fusion")
    base = torch.randn(3, 10, 2, 12, device=device)
    f = base[:, ::2, 0, :]
    lg = base[:, 1::2, 1, :]
    close(mmkernels.gated_fusion(f, lg, backend=backend), reference(f, lg), torch.float32)
    empty = torch.randn(2, 0, 4, device=device)
    assert mmkernels.gated_fusion(empty, empty, backend=backend).shape == (0, 4)


@pytest.mark.parametrize("backend,device", compiled_backends())
def test_opcheck(backend, device):
    require_backend(backend, device, op="gated_fusion")
    f, lg, p = _inputs(3, (9,), 7, torch.float32, device)
    for present in (None, p.reshape(3, 9)):
        for return_gates in (False, True):
            torch.library.opcheck(torch.ops.mmkernels.gated_fusion_fwd.default,
                                  (f, lg, present, 0, return_gates))
        for activation, grad_gates in ((0, torch.randn_like(f)), (1, None)):
            torch.library.opcheck(torch.ops.mmkernels.gated_fusion_bwd.default,
                                  (torch.randn(9, 7, device=device), grad_gates, f.detach(), lg.detach(), present,
                                   activation))


@pytest.mark.parametrize("backend,device", [p for p in compiled_backends() if p.values[0] == "cpu"])
def test_gradcheck_fp64(backend, device):
    require_backend(backend, device, torch.float64, op="gated_fusion")
    f, lg, p = _inputs(3, (4,), 5, torch.float64, device)

    def fn(f, lg):
        fused, gates = mmkernels.gated_fusion(f, lg, p, return_gates=True, backend=backend)
        return fused, gates

    assert torch.autograd.gradcheck(fn, (f, lg))


@pytest.mark.parametrize("backend,device", compiled_backends())
def test_compile_fullgraph(backend, device):
    require_backend(backend, device, op="gated_fusion")
    torch._dynamo.reset()
    f, lg, p = _inputs(3, (6, 4), 8, torch.float32, device)

    def fn(f, lg, p):
        return mmkernels.gated_fusion(f, lg, p, backend=backend).square().sum()

    compiled = torch.compile(fn, fullgraph=True)
    loss = compiled(f, lg, p)
    close(loss, fn(f, lg, p), torch.float32)
    for a, b in zip(torch.autograd.grad(loss, [f, lg]), torch.autograd.grad(fn(f, lg, p), [f, lg])):
        close(a, b, torch.float32)
