"""Triton backend: both ops, forward and backward, against the fp64 reference.

On a machine without a GPU the kernels run on CPU tensors through Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py before triton is imported;
set here too as a guard): small shapes, eager ops plus the opcheck subset that
the interpreter supports (DESIGN.md 5). With a GPU the same tests run on CUDA,
plus the full opcheck and torch.compile(fullgraph=True).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mmkernels  # noqa: E402
from mmkernels import backends  # noqa: E402
from mmkernels.reference import cross_modal_attention_reference  # noqa: E402
from mmkernels.reference import gated_fusion_reference as gf_reference  # noqa: E402
from utils import LOW_PRECISION, assert_within_rule, attention_inputs, must_have, stable_seed  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (full opcheck and torch.compile of Triton ops)")


@pytest.fixture(scope="module", autouse=True)
def _triton_usable():
    reasons = backends.not_supported_reasons(
        "triton", backends.Call("cross_modal_attention", DEVICE, torch.float32, 1, 16, 16))
    if reasons:
        if must_have("triton"):  # a GPU machine under MMKERNELS_REQUIRE_EXT=1: never a silent skip
            pytest.fail("the triton backend must run here: " + "; ".join(reasons))
        pytest.skip("triton backend unavailable here: " + "; ".join(reasons))
    mmkernels.ops.load_backend("triton")
    if DEVICE == "cpu" and not mmkernels.triton.cross_modal_attention.INTERPRET:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")


def _tt():
    import mmkernels.triton as mt
    return mt


def _close(a, b, atol=1e-4, rtol=2e-4, name=""):
    assert not torch.isnan(a).any(), f"{name}: NaN"
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _diff(q, keys, values, kw):
    return [q, *keys, *values, *[kw[n] for n in ("modality_bias", "head_gate") if n in kw]]


def _to64(q, keys, values, kw):
    c = lambda t: t.detach().double().requires_grad_(True)  # noqa: E731
    kw2 = {n: (c(v) if n in ("modality_bias", "head_gate") else v) for n, v in kw.items()}
    return c(q), [c(k) for k in keys], [c(v) for v in values], kw2


def _check_vs_fp64(q, keys, values, kw, atol=1e-4, rtol=2e-4, **extra):
    """Forward (out, lse) and backward (every grad, with a grad on lse too) vs the fp64 reference."""
    out, lse = mmkernels.cross_modal_attention(q, keys, values, **kw, **extra, return_lse=True, backend="triton")
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    q64, k64, v64, kw64 = _to64(q, keys, values, kw)
    ref, lse_ref = cross_modal_attention_reference(q64, k64, v64, **kw64, **extra, return_lse=True)
    _close(out, ref, atol, rtol, "out")
    assert torch.equal(lse.isneginf(), lse_ref.isneginf())
    _close(torch.where(lse.isfinite(), lse, 0), torch.where(lse_ref.isfinite(), lse_ref, 0), atol, rtol, "lse")
    g = torch.Generator().manual_seed(0)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
    gl = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(out.device)
    loss = (out * go.to(out.dtype)).sum() + (torch.where(lse.isfinite(), lse, 0) * gl.float()).sum()
    loss_ref = (ref * go).sum() + (torch.where(lse_ref.isfinite(), lse_ref, 0) * gl).sum()
    grads = torch.autograd.grad(loss, _diff(q, keys, values, kw))
    grads_ref = torch.autograd.grad(loss_ref, _diff(q64, k64, v64, kw64))
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        _close(a, b, atol, rtol, f"grad {i}")
    return out, lse, grads


# (B, Lq, Lks, Hq, Hkv, D, Dv): odd sizes, M = 1..4, MHA / GQA / MQA, non-pow2 D and Dv.
SHAPES = [
    (2, 5, (7,), 2, 2, 16, 16),
    (2, 3, (9, 30), 4, 2, 20, 12),
    (1, 6, (1, 17, 5), 6, 1, 32, 24),
    (2, 4, (5, 11, 3, 8), 4, 2, 8, 8),
]
FEATURES = [dict(), dict(q_pad=True, bias=True, gate=True), dict(noncontig=True, bias=True, padded=False)]
if CUDA:  # every shape is a new set of kernel compilations on the GPU: keep the informative two
    SHAPES = SHAPES[1:3]


@pytest.mark.parametrize("features", FEATURES, ids=["plain", "qpad-bias-gate", "noncontig-nolen"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}L{s[1]}-M{len(s[2])}-H{s[3]}/{s[4]}-D{s[5]}/{s[6]}")
def test_attention_fp32_matches_reference(shape, features):
    torch.manual_seed(stable_seed(shape, sorted(features)))
    B, Lq, Lks, Hq, Hkv, D, Dv = shape
    q, keys, values, kw = attention_inputs(B, Lq, Lks, Hq, Hkv, D, Dv, torch.float32, DEVICE, grad=True, **features)
    _check_vs_fp64(q, keys, values, kw)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", [SHAPES[1], (1, 9, (40,), 4, 1, 32, 32)], ids=["M2-GQA", "M1-MQA"])
def test_attention_low_precision_within_rule(dtype, shape):
    torch.manual_seed(1)
    B, Lq, Lks, Hq, Hkv, D, Dv = shape
    q, keys, values, kw = attention_inputs(B, Lq, Lks, Hq, Hkv, D, Dv, torch.float64, DEVICE,
                                           q_pad=True, bias=True, gate=True)
    c = lambda t, dt: t.detach().to(dt).requires_grad_(True)  # noqa: E731

    def as_(dt):
        kw2 = {n: (c(v, torch.float64 if dt == torch.float64 else torch.float32)
                   if n in ("modality_bias", "head_gate") else v) for n, v in kw.items()}
        return c(q, dt), [c(k, dt) for k in keys], [c(v, dt) for v in values], kw2

    x64, xlo, xref = as_(torch.float64), as_(dtype), as_(dtype)
    out64 = cross_modal_attention_reference(*x64[:3], **x64[3])
    out = mmkernels.cross_modal_attention(*xlo[:3], **xlo[3], backend="triton")
    out_low = cross_modal_attention_reference(*xref[:3], **xref[3], upcast=False)
    assert_within_rule(out, out64, out_low)
    go = torch.randn(out64.shape, dtype=torch.float64, device=DEVICE)
    g64 = torch.autograd.grad(out64, _diff(*x64), go)
    g = torch.autograd.grad(out, _diff(*xlo), go.to(dtype))
    glow = torch.autograd.grad(out_low, _diff(*xref), go.to(dtype))
    for i, (a, b, r) in enumerate(zip(g, g64, glow)):
        assert_within_rule(a, b, r, name=f"grad {i}")


@pytest.mark.parametrize("shape", [(2, 17, 40, 4, 2), (3, 9, 5, 2, 1), (2, 6, 6, 2, 2)])
def test_causal_bottom_right_aligned(shape):
    torch.manual_seed(2)
    B, Lq, Lk, Hq, Hkv = shape
    q, keys, values, kw = attention_inputs(B, Lq, (Lk,), Hq, Hkv, 16, 16, torch.float32, DEVICE,
                                           q_pad=True, bias=True, grad=True)
    _check_vs_fp64(q, keys, values, kw, causal=True)


@pytest.mark.parametrize("num_splits", [None, 3, 7])
def test_split_kv_path(num_splits):
    """Flash-decoding path (thresholds lowered so tiny shapes take it), with every feature."""
    mt = _tt()
    torch.manual_seed(3)
    q, keys, values, kw = attention_inputs(2, 3, (9, 40, 6), 4, 2, 16, 24, torch.float32, DEVICE,
                                           q_pad=True, bias=True, gate=True, grad=True)
    kw["kv_lengths"][0, 1] = 0
    with mt.split_kv_settings(min_keys=1, num_splits=num_splits, keys_per_split=16):
        ns = mt.cross_modal_attention.num_kv_splits(q, 2, 2, 3, 2, 55)
        assert ns > 1 and (num_splits is None or ns == num_splits)
        _check_vs_fp64(q, keys, values, kw)
    # causal through the split path too
    q, keys, values, kw = attention_inputs(2, 5, (37,), 2, 1, 16, 16, torch.float32, DEVICE, q_pad=True, grad=True)
    with mt.split_kv_settings(min_keys=1, num_splits=num_splits or 4):
        _check_vs_fp64(q, keys, values, kw, causal=True)


def test_split_kv_thresholds_default():
    mt = _tt()
    q = torch.empty(1, 64, 16, 128, device=DEVICE)
    assert mt.cross_modal_attention.num_kv_splits(q, 1, 16, 64, 1, 4096) >= 1
    assert mt.cross_modal_attention.num_kv_splits(q, 1, 16, 512, 1, 100000) == 1   # Lq > 128: no split
    assert mt.cross_modal_attention.num_kv_splits(q, 1, 16, 64, 1, 1000) == 1      # short keys: no split


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_padded_rows_give_zero_not_nan(dtype):
    torch.manual_seed(4)
    q, keys, values, kw = attention_inputs(3, 6, (9, 4), 4, 2, 16, 16, dtype, DEVICE,
                                           q_pad=True, bias=True, gate=True, grad=True)
    kw["kv_lengths"][0] = 0
    kw["q_lengths"][:] = torch.tensor([6, 2, 0])
    out, lse = mmkernels.cross_modal_attention(q, keys, values, **kw, return_lse=True, backend="triton")
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    assert torch.all(out[1, 2:] == 0) and torch.all(lse[1, :, 2:] == float("-inf"))
    assert torch.all(out[2] == 0)
    grads = torch.autograd.grad(out.float().pow(2).sum(), _diff(q, keys, values, kw))
    for g in grads:
        assert not g.isnan().any()
    assert torch.all(grads[0][0] == 0) and torch.all(grads[0][1, 2:] == 0)
    for gk in grads[1:5]:
        assert torch.all(gk[0] == 0) and torch.all(gk[2] == 0)


def test_empty_batch_empty_segment_empty_queries():
    q, keys, values, kw = attention_inputs(0, 5, (7, 3), 4, 2, 8, 8, torch.float32, DEVICE, grad=True)
    out = mmkernels.cross_modal_attention(q, keys, values, **kw, backend="triton")
    assert out.shape == (0, 5, 4, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape
    torch.manual_seed(5)
    q, keys, values, kw = attention_inputs(2, 5, (0, 6), 4, 2, 8, 8, torch.float32, DEVICE, grad=True, bias=True)
    _check_vs_fp64(q, keys, values, kw)
    q, keys, values, kw = attention_inputs(2, 0, (4,), 4, 2, 8, 8, torch.float32, DEVICE, grad=True)
    out = mmkernels.cross_modal_attention(q, keys, values, **kw, backend="triton")
    out.sum().backward()
    assert torch.all(keys[0].grad == 0)


def test_zero_gate_still_trains_and_bias_grad_deterministic():
    torch.manual_seed(6)
    q, keys, values, kw = attention_inputs(2, 7, (9, 6), 4, 2, 16, 16, torch.float32, DEVICE,
                                           bias=True, gate=True, grad=True)
    with torch.no_grad():
        kw["head_gate"][:2] = 0
    _check_vs_fp64(q, keys, values, kw)
    runs = []
    for _ in range(2):
        out = mmkernels.cross_modal_attention(q, keys, values, **kw, backend="triton")
        runs.append(torch.autograd.grad(out.sum(), [kw["modality_bias"], kw["head_gate"]]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][1][:2].abs().sum() > 0


def test_grads_of_a_plain_sum_match_reference():
    """out.sum() hands the backward an expanded gradient (every stride 0): the kernels index
    the last dim with stride 1, so the op must not pass such a tensor through as is."""
    torch.manual_seed(8)
    q, keys, values, kw = attention_inputs(2, 5, (9, 6), 4, 2, 16, 16, torch.float32, DEVICE,
                                           bias=True, gate=True, grad=True)
    out = mmkernels.cross_modal_attention(q, keys, values, **kw, backend="triton")
    grads = torch.autograd.grad(out.sum(), _diff(q, keys, values, kw))
    q64, k64, v64, kw64 = _to64(q, keys, values, kw)
    grads_ref = torch.autograd.grad(cross_modal_attention_reference(q64, k64, v64, **kw64).sum(), _diff(q64, k64, v64, kw64))
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        _close(a, b, 1e-4, 2e-4, f"grad {i}")
    f = torch.randn(3, 5, 8, device=DEVICE, requires_grad=True)
    lg = torch.randn(3, 5, 8, device=DEVICE, requires_grad=True)
    gf = torch.autograd.grad(mmkernels.gated_fusion(f, lg, backend="triton").sum(), [f, lg])
    f64, lg64 = f.detach().double().requires_grad_(), lg.detach().double().requires_grad_()
    gf_ref = torch.autograd.grad(gf_reference(f64, lg64).sum(), [f64, lg64])
    for i, (a, b) in enumerate(zip(gf, gf_ref)):
        _close(a, b, 1e-5, 1e-5, f"gated fusion grad {i}")


def test_double_backward_is_an_error():
    q = torch.randn(2, 3, 2, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 5, 2, 16, device=DEVICE, requires_grad=True)
    (g,) = torch.autograd.grad(mmkernels.cross_modal_attention(q, [k], [k], backend="triton").square().sum(), q,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="has no second derivative"):
        g.sum().backward()


def test_not_supported_reasons():
    call = backends.Call("cross_modal_attention", DEVICE, torch.float32, 3, 64, 64)
    assert backends.not_supported_reasons("triton", call) == []
    assert backends.not_supported_reasons("triton", backends.Call("gated_fusion", DEVICE, torch.bfloat16, 3)) == []
    assert backends.not_supported_reasons(
        "triton", backends.Call("cross_modal_attention", DEVICE, torch.float64, 1, 64, 64))
    assert backends.not_supported_reasons(
        "triton", backends.Call("cross_modal_attention", DEVICE, torch.float32, 1, 512, 64))


_OPCHECK_CPU = ("test_schema", "test_autograd_registration", "test_faketensor")


def _cross_modal_attention_args(feats):
    q, keys, values, kw = attention_inputs(2, 5, (7, 3), 4, 2, 16, 16, torch.float32, DEVICE, grad=True, **feats)
    return (q, keys, values, kw.get("kv_lengths"), kw.get("q_lengths"), kw.get("modality_bias"),
            kw.get("head_gate"), 0.25, False)


@pytest.mark.parametrize("feats", [dict(), dict(q_pad=True, bias=True, gate=True)], ids=["plain", "all"])
def test_opcheck_attention(feats):
    _tt()
    torch.manual_seed(7)
    args = _cross_modal_attention_args(feats)
    utils = None if CUDA else _OPCHECK_CPU
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(torch.ops.mmkernels.triton_cross_modal_attention_fwd, args, **kwargs)
    out, lse, out_u = torch.ops.mmkernels.triton_cross_modal_attention_fwd(*args)
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), *[a.detach() if isinstance(a, torch.Tensor) else a
                for a in args[:1]], [k.detach() for k in args[1]], [v.detach() for v in args[2]],
                (out_u if args[6] is not None else out).detach(), lse.detach(),
                *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[3:]])
    torch.library.opcheck(torch.ops.mmkernels.triton_cross_modal_attention_bwd, bwd_args, **kwargs)


def test_opcheck_attention_causal_and_bf16():
    _tt()
    torch.manual_seed(17)
    kwargs = {} if CUDA else {"test_utils": _OPCHECK_CPU}
    for Lks, dtype, causal in (((9,), torch.float32, True), ((7, 3), torch.bfloat16, False),
                               ((6,), torch.bfloat16, True)):
        q, keys, values, kw = attention_inputs(2, 5, Lks, 4, 2, 16, 16, dtype, DEVICE, q_pad=True, bias=True,
                                               gate=True, grad=True)
        args = (q, keys, values, kw["kv_lengths"], kw["q_lengths"], kw["modality_bias"], kw["head_gate"], 0.25,
                causal)
        torch.library.opcheck(torch.ops.mmkernels.triton_cross_modal_attention_fwd, args, **kwargs)
        out, lse, out_u = torch.ops.mmkernels.triton_cross_modal_attention_fwd(*args)
        bwd_args = (torch.randn_like(out), torch.randn_like(lse), q.detach(), [k.detach() for k in keys],
                    [v.detach() for v in values], out_u.detach(), lse.detach(),
                    *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[3:]])
        torch.library.opcheck(torch.ops.mmkernels.triton_cross_modal_attention_bwd, bwd_args, **kwargs)


def test_opcheck_gated_fusion():
    _tt()
    torch.manual_seed(8)
    f, lg, p = _gf_inputs(3, (5,), 7, torch.float32)
    kwargs = {} if CUDA else {"test_utils": _OPCHECK_CPU}
    for args in ((f, lg, p, 0, True), (f, lg, None, 1, False)):
        torch.library.opcheck(torch.ops.mmkernels.triton_gated_fusion_fwd, args, **kwargs)
    gf = torch.randn(5, 7, device=DEVICE)
    torch.library.opcheck(torch.ops.mmkernels.triton_gated_fusion_bwd,
                          (gf, torch.randn_like(f), f.detach(), lg.detach(), p, 0), **kwargs)


@needs_cuda
def test_compile_fullgraph_attention_no_recompile():
    torch.manual_seed(9)
    torch._dynamo.reset()
    q, keys, values, kw = attention_inputs(2, 33, (70, 129), 8, 2, 64, 64, torch.bfloat16, "cuda",
                                           q_pad=True, bias=True, gate=True, grad=True)

    @torch.compile(fullgraph=True)
    def step(q, k0, k1, v0, v1, kv_lengths, q_lengths, bias, gate):
        out = mmkernels.cross_modal_attention(q, [k0, k1], [v0, v1], kv_lengths, q_lengths, bias, gate,
                                              backend="triton")
        return out.float().square().sum()

    args = (q, *keys, *values, kw["kv_lengths"], kw["q_lengths"], kw["modality_bias"], kw["head_gate"])
    loss = step(*args)
    grads = torch.autograd.grad(loss, [q, *keys, *values, kw["modality_bias"], kw["head_gate"]])
    eager = mmkernels.cross_modal_attention(q, keys, values, backend="triton", **kw).float().square().sum()
    grads_e = torch.autograd.grad(eager, [q, *keys, *values, kw["modality_bias"], kw["head_gate"]])
    torch.testing.assert_close(loss, eager, rtol=1e-3, atol=1e-3)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    # new lengths: no recompilation
    from torch._dynamo.utils import counters
    before = counters["stats"]["unique_graphs"]
    kw2 = dict(kw, kv_lengths=torch.randint(0, 70, (2, 2), device="cuda", dtype=torch.int32))
    new_q_lengths = torch.tensor([0, 33], device="cuda")
    step(q, *keys, *values, kw2["kv_lengths"], new_q_lengths, kw["modality_bias"], kw["head_gate"])
    assert counters["stats"]["unique_graphs"] == before


@needs_cuda
def test_compile_fullgraph_gated_fusion():
    torch._dynamo.reset()
    f, lg, p = _gf_inputs(3, (4, 33), 64, torch.bfloat16)

    @torch.compile(fullgraph=True)
    def step(f, lg, p):
        fused, gates = mmkernels.gated_fusion(f, lg, p, return_gates=True, backend="triton")
        return fused.float().square().sum() + gates.float().sum()

    loss = step(f, lg, p)
    g = torch.autograd.grad(loss, [f, lg])
    fused, gates = mmkernels.gated_fusion(f, lg, p, return_gates=True, backend="triton")
    eager = fused.float().square().sum() + gates.float().sum()
    ge = torch.autograd.grad(eager, [f, lg])
    torch.testing.assert_close(loss, eager, rtol=1e-3, atol=1e-3)
    for a, b in zip(g, ge):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- gated fusion
def _gf_inputs(M, lead, H, dtype, present=True):
    f = (torch.randn(M, *lead, H, dtype=torch.float64, device=DEVICE) * 2).to(dtype).requires_grad_(True)
    lg = (torch.randn(M, *lead, H, dtype=torch.float64, device=DEVICE) * 2).to(dtype).requires_grad_(True)
    p = None
    if present:
        p = torch.rand(M, *lead, device=DEVICE) > 0.3
        p.view(M, -1)[:, 0] = False  # one position with no modality present
    return f, lg, p


@pytest.mark.parametrize("activation", ["tanh", "identity"])
@pytest.mark.parametrize("shape", [(1, (7,), 5), (2, (3, 11), 16), (3, (130,), 3), (4, (2, 5), 33)],
                         ids=lambda s: f"M{s[0]}-{'x'.join(map(str, s[1]))}-H{s[2]}")
@pytest.mark.parametrize("present", [True, False])
def test_gated_fusion_fp32_matches_reference(shape, activation, present):
    torch.manual_seed(10)
    M, lead, H = shape
    f, lg, p = _gf_inputs(M, lead, H, torch.float32, present)
    fused, gates = mmkernels.gated_fusion(f, lg, p, activation, return_gates=True, backend="triton")
    f64, lg64 = f.detach().double().requires_grad_(True), lg.detach().double().requires_grad_(True)
    rf, rg = gf_reference(f64, lg64, p, activation, return_gates=True)
    _close(fused, rf, 1e-5, 1e-4, "fused")
    _close(gates, rg, 1e-5, 1e-4, "gates")
    w1, w2 = torch.randn_like(rf), torch.randn_like(rg)
    g = torch.autograd.grad((fused * w1.float()).sum() + (gates * w2.float()).sum(), [f, lg])
    gr = torch.autograd.grad((rf * w1).sum() + (rg * w2).sum(), [f64, lg64])
    for i, (a, b) in enumerate(zip(g, gr)):
        _close(a, b, 1e-5, 1e-4, f"grad {i}")
    if present:
        assert torch.all(fused.reshape(-1, H)[0] == 0) and not fused.isnan().any()


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("activation", ["tanh", "identity"])
def test_gated_fusion_low_precision_within_rule(dtype, activation):
    torch.manual_seed(11)
    f, lg, p = _gf_inputs(3, (9, 7), 24, dtype)
    f64, lg64 = f.detach().double().requires_grad_(True), lg.detach().double().requires_grad_(True)
    fr, lgr = f.detach().clone().requires_grad_(True), lg.detach().clone().requires_grad_(True)
    out = mmkernels.gated_fusion(f, lg, p, activation, backend="triton")
    out64 = gf_reference(f64, lg64, p, activation)
    out_low = gf_reference(fr, lgr, p, activation, upcast=False)
    assert_within_rule(out, out64, out_low)
    go = torch.randn(out64.shape, dtype=torch.float64, device=DEVICE)
    for i, (a, b, c) in enumerate(zip(torch.autograd.grad(out, [f, lg], go.to(dtype)),
                                      torch.autograd.grad(out64, [f64, lg64], go),
                                      torch.autograd.grad(out_low, [fr, lgr], go.to(dtype)))):
        assert_within_rule(a, b, c, name=f"grad {i}")


# ---------------------------------------------------------------- compiled for sm_90 without a GPU
_AOT_SCRIPT = r'''
import sys
import mmkernels.triton.cross_modal_attention_kernels as A
import mmkernels.triton.gated_fusion as GF
from mmkernels.triton._aot import SM90_MAX_SHARED, compile_sm90, resource_usage

def compile_(kernel, consts, ptrs, floats=(), warps=4):
    compile_sm90(kernel, consts, ptrs, floats, num_warps=warps, num_stages=2)
    print("compiled", kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__, flush=True)

ptr = {"*": "*bf16", "KVLEN": "*i32", "QLEN": "*i64", "KM": "*u8", **{f"KM{m}": "*u8" for m in range(8)}}
for n in ["BIAS", "GATE_T", "LSE", "OPART", "LPART", "DLT", "DBIAS", "RD"]:
    ptr[n] = "*fp32"
flags = dict(NUM_SEG=2, HAS_KVLEN=True, HAS_QLEN=True, HAS_BIAS=True, HAS_GATE=True, CAUSAL=False, IEEE=False,
             HAS_MASK=True)
dims = dict(D=48, DV=64, BLOCK_D=64, BLOCK_DV=64, BLOCK_M=32, BLOCK_N=32)
compile_(A._cross_modal_attention_fwd_kernel, dict(dims, SPLIT=True, **flags), ptr, ("qk_scale",))
compile_(A._cross_modal_attention_fwd_kernel, dict(dims, SPLIT=False, **dict(flags, NUM_SEG=1, CAUSAL=True, HAS_MASK=False)), ptr, ("qk_scale",))
compile_(A._cross_modal_attention_merge_kernel, dict(DV=64, BLOCK_DV=64, NS_P2=4, HAS_GATE=True), ptr)
compile_(A._cross_modal_attention_bwd_pre_kernel, dict(DV=64, BLOCK_DV=64, BLOCK_R=32), ptr)
compile_(A._cross_modal_attention_bwd_dq_kernel, dict(dims, **flags), ptr, ("qk_scale", "scale"))
compile_(A._cross_modal_attention_bwd_dkdv_kernel, dict(dims, **dict(flags, CAUSAL=True)), ptr, ("qk_scale", "scale"))
gptr = {"*": "*bf16", "P": "*u8"}
compile_(GF._gf_fwd_kernel, dict(M=3, MP2=4, HAS_P=True, ACT=0, RET_G=True, BLOCK=256), gptr)
compile_(GF._gf_bwd_kernel, dict(M=3, MP2=4, HAS_P=True, ACT=0, HAS_GG=True, BLOCK=256), gptr)

# the no-autotune default of every kernel fits an H200 at the targets' shapes
sys.path.insert(0, "benchmarks")
import triton_resources
for name, kernel, consts, ptrs, floats, configs in triton_resources.cases(128, False):
    cfg = configs[0]
    u = resource_usage(compile_sm90(kernel, {**consts, **cfg.kwargs}, ptrs, floats,
                                    num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    spill = u.get("stack", 0) + u.get("local", 0)
    print("default", name, u, flush=True)
    assert u["shared"] <= SM90_MAX_SHARED and spill == 0, (name, cfg, u)
'''


@pytest.mark.skipif(CUDA, reason="on a GPU the kernels run for real")
@pytest.mark.skipif(os.environ.get("MMKERNELS_SKIP_TRITON_AOT") == "1", reason="MMKERNELS_SKIP_TRITON_AOT=1")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter runs the kernels as Python: this compiles them for real (sm_90, bf16,
    ptxas included) so that compiled-mode typing errors show up on a machine without a GPU,
    and checks that each kernel's no-autotune config neither spills nor overflows shared memory."""
    import subprocess
    import sys

    try:
        import triton.backends.nvidia  # noqa: F401
    except Exception:  # noqa: BLE001
        pytest.skip("triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MMKERNELS_TRITON_AUTOTUNE"] = "0"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                       cwd=repo)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("compiled") == 8
    assert r.stdout.count("default ") == 6


def test_generated_attention_module_is_up_to_date():
    """cross_modal_attention_kernels.py is generated from its .py.in template: an edit of one alone must not land."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mmkernels.triton._codegen", "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- offsets past 2**31 elements
_BIG_OFFSETS_SCRIPT = r'''
import sys
import torch
import mmkernels
from mmkernels.reference import cross_modal_attention_reference as ref

device, real, backend = sys.argv[1], sys.argv[2] == "real", sys.argv[3]
torch.manual_seed(0)
H, D, Lq, Lk = 3, 16, 2, 5


def big_head_stride(L):
    """A (1, L, H, D) fp16 view whose head stride is just over 2**30 elements: head 2 starts past
    2**31, which int32 offsets (h * stride) wrap. Only the viewed elements are touched, so the
    4 GiB buffer costs no memory on CPU."""
    stride_h = 2**30 + 64
    buf = torch.empty(stride_h * (H - 1) + L * D + 64, dtype=torch.float16, device=device)
    t = buf.as_strided((1, L, H, D), (stride_h * H, D, stride_h, 1))
    for h in range(H):
        t[:, :, h] = torch.randn(1, L, D, device=device).half()
    return t


if real:  # what the transformers backend passes: a (B, H, L, D) tensor of > 2**31 elements, transposed
    Lq = 2**27 // 16 + 5
    q = torch.randn(1, 16, Lq, D, dtype=torch.float16, device=device).transpose(1, 2)
    H = 16
    k = torch.randn(1, Lk, H, D, dtype=torch.float16, device=device)
    v = torch.randn(1, Lk, H, D, dtype=torch.float16, device=device)
    assert q.numel() > 2**31
else:
    q, k, v = big_head_stride(Lq), big_head_stride(Lk), big_head_stride(Lk)
q.requires_grad_(True)
out = mmkernels.cross_modal_attention(q, [k], [v], backend=backend)
go = torch.randn_like(out)
(dq,) = torch.autograd.grad(out, [q], go)
rows = slice(None) if not real else slice(Lq - 64, Lq)  # the reference materialises scores: the last rows
q64 = q.detach()[:, rows].double().requires_grad_(True)
expect = ref(q64, [k.double()], [v.double()])
(dq_ref,) = torch.autograd.grad(expect, [q64], go[:, rows].double())
torch.testing.assert_close(out[:, rows].double(), expect, atol=2e-3, rtol=2e-3)
torch.testing.assert_close(dq[:, rows].double(), dq_ref, atol=2e-3, rtol=2e-3)
print("ok")
'''


@pytest.mark.parametrize("kind,backend", [("strided", "triton"), pytest.param("real", "triton", marks=needs_cuda),
                                          pytest.param("real", "cuda", marks=needs_cuda)])
def test_offsets_past_2_31_elements(kind, backend):
    """Head and batch offsets are int64 in every Triton kernel (and the CUDA ones). In a
    subprocess: a wrapped offset reads out of bounds, which may kill the process rather than raise."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _BIG_OFFSETS_SCRIPT, DEVICE, kind, backend], capture_output=True,
                       text=True, timeout=600, cwd=repo)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout[-2000:], r.stderr[-3000:])


def test_first_call_loads_the_backend_and_selection_alone_does_not():
    """In a fresh process: choosing the triton backend loads nothing; the first call of each op
    on it imports the kernels and registers their fake kernels and autograd (the load step)."""
    import subprocess
    import sys

    code = (
        "import sys, torch, mmkernels\n"
        "from mmkernels import backends\n"
        f"dev = {DEVICE!r}\n"
        "assert backends.select(backends.Call('gated_fusion', dev, torch.float32, 2), 'triton') == 'triton'\n"
        "assert 'mmkernels.ops._load_triton' not in sys.modules\n"
        "q = torch.randn(1, 2, 2, 8, device=dev, requires_grad=True)\n"
        "out = mmkernels.cross_modal_attention(q, [q.detach()], [q.detach()], backend='triton')\n"
        "out.sum().backward()\n"
        "f = torch.randn(2, 3, 4, device=dev, requires_grad=True)\n"
        "mmkernels.gated_fusion(f, f.detach(), backend='triton').sum().backward()\n"
        "assert 'mmkernels.ops._load_triton' in sys.modules and q.grad is not None and f.grad is not None\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-3000:]
