"""The op contracts (DESIGN.md 2) at their edges, on every backend that runs here.

Each test states one promise of the contract and checks it on the reference, the
C++ CPU kernels, Triton (under its interpreter without a GPU) and, with a GPU,
the CUDA kernels: rows whose logits are all -inf, gated-fusion units whose present
logits are all -inf, out-of-range lengths, M up to 8, causal attention over
several key blocks in low precision, bias and gate in q's dtype, empty batches
and empty query sets with their gradients, non-contiguous gated-fusion inputs.
"""
import pytest
import torch

import mmkernels
from mmkernels.reference import cross_modal_attention_reference
from mmkernels.reference import gated_fusion_reference as gf_reference
from utils import (
    LOW_PRECISION,
    assert_within_rule,
    attention_grads,
    attention_inputs,
    every_backend,
    exact_dtype,
    kernel_backends,
    require_backend,
    stable_seed,
)

NEG_INF = float("-inf")


def _dtype_for(backend, device):
    """The most exact dtype the backend runs: fp64 where it can, fp32 otherwise."""
    return exact_dtype(device) if backend in ("cpu", "reference") else torch.float32


def _tol(dtype):
    return dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=2e-4)


def _fp64(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def _check_attention(backend, q, keys, values, kw, **extra):
    """Out, lse and every gradient of `backend` against the reference on fp64 copies."""
    dtype = q.dtype
    diff = [q, *keys, *values] + [kw[n] for n in ("modality_bias", "head_gate") if n in kw]
    out, lse = mmkernels.cross_modal_attention(q, keys, values, **kw, **extra, return_lse=True, backend=backend)
    d64 = _fp64(*diff)
    M = len(keys)
    kw64 = dict(kw)
    for i, n in enumerate(n for n in ("modality_bias", "head_gate") if n in kw):
        kw64[n] = d64[1 + 2 * M + i]
    ref, lse_ref = cross_modal_attention_reference(d64[0], d64[1 : 1 + M], d64[1 + M : 1 + 2 * M], **kw64, **extra, return_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), ref, **_tol(dtype))
    assert torch.equal(lse.isneginf(), lse_ref.isneginf())
    torch.testing.assert_close(torch.where(lse.isfinite(), lse, 0).double(),
                               torch.where(lse_ref.isfinite(), lse_ref, 0), **_tol(dtype))
    for i, (a, b) in enumerate(zip(attention_grads(out, lse, diff), attention_grads(ref, lse_ref, d64))):
        assert not a.isnan().any(), f"grad {i} has NaN"
        torch.testing.assert_close(a.double(), b, **_tol(dtype), msg=lambda m: f"grad {i}: {m}")
    return out, lse


# ---------------------------------------------------------------- rows whose logits are all -inf
@pytest.mark.parametrize("backend,device", every_backend())
def test_rows_with_all_logits_neg_inf_are_empty_rows(backend, device):
    """A -inf modality_bias on every modality a head sees leaves that head's rows with no
    valid key: output 0, lse -inf, zero gradients (never NaN)."""
    dtype = _dtype_for(backend, device)
    require_backend(backend, device, dtype)
    torch.manual_seed(11)
    q, keys, values, kw = attention_inputs(2, 5, (7, 4), 4, 2, 8, 8, dtype, device, bias=True, gate=True,
                                           grad=True)
    with torch.no_grad():
        kw["modality_bias"][1] = NEG_INF          # head 1 sees nothing
        kw["modality_bias"][2, 0] = NEG_INF       # head 2 sees only modality 1
    diff = [q, *keys, *values, kw["modality_bias"], kw["head_gate"]]
    out, lse = mmkernels.cross_modal_attention(q, keys, values, **kw, return_lse=True, backend=backend)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.all(out[:, :, 1] == 0) and torch.all(lse[:, 1] == NEG_INF)
    # Head 2 is attention over modality 1 alone (independent of the bias path).
    alone = cross_modal_attention_reference(*_fp64(q), [keys[1].detach().double()], [values[1].detach().double()],
                          kv_lengths=kw["kv_lengths"][:, 1:],
                          modality_bias=kw["modality_bias"].detach().double()[:, 1:],
                          head_gate=kw["head_gate"].detach().double())
    torch.testing.assert_close(out[:, :, 2].double(), alone[:, :, 2], **_tol(dtype))
    grads = attention_grads(out, lse, diff)
    for i, g in enumerate(grads):
        assert not g.isnan().any(), f"grad {i} has NaN"
    assert torch.all(grads[0][:, :, 1] == 0)                       # q of the empty head
    gbias = grads[5]
    assert torch.all(gbias[1] == 0) and gbias[2, 0] == 0 and torch.all(gbias[[0, 3]] != 0)


# ---------------------------------------------------------------- gated fusion: all -inf, NaN of absent
@pytest.mark.parametrize("backend,device", every_backend())
@pytest.mark.parametrize("activation", ["tanh", "identity"])
def test_gated_fusion_all_present_logits_neg_inf_and_nan_of_absent(backend, device, activation):
    dtype = _dtype_for(backend, device)
    require_backend(backend, device, dtype, op="gated_fusion")
    torch.manual_seed(12)
    M, N, H = 3, 6, 5
    f = torch.randn(M, N, H, dtype=dtype, device=device)
    lg = torch.randn(M, N, H, dtype=dtype, device=device)
    present = torch.ones(M, N, dtype=torch.bool, device=device)
    present[0, 1] = False
    lg[1:, 1, :2] = NEG_INF          # position 1, units 0-1: every present logit is -inf
    lg[:, 2, 3] = NEG_INF            # position 2, unit 3: every logit is -inf
    present[2, 4] = False
    f[2, 4] = float("nan")           # an absent modality's features are NaN
    f[0, 1] = float("inf")           # and +inf
    lg[1, 5, 0] = NEG_INF
    f[1, 5, 0] = float("nan")        # a present modality with a -inf logit takes no part either
    f.requires_grad_(True)
    lg.requires_grad_(True)
    fused, gates = mmkernels.gated_fusion(f, lg, present, activation, return_gates=True, backend=backend)
    assert not fused.isnan().any() and not gates.isnan().any()
    assert torch.all(fused[1, :2] == 0) and torch.all(fused[2, 3] == 0)
    assert torch.all(gates[:, 1, :2] == 0) and torch.all(gates[:, 2, 3] == 0)
    w = torch.randn(N, H, dtype=torch.float64, device=device)
    gf, gl = torch.autograd.grad((fused.double() * w).sum() + gates.double().sum(), [f, lg])
    assert not gf.isnan().any() and not gl.isnan().any()
    assert torch.all(gf[:, 1, :2] == 0) and torch.all(gl[:, 1, :2] == 0)
    assert torch.all(gf[2, 4] == 0) and torch.all(gf[0, 1] == 0) and gf[1, 5, 0] == 0
    # Independent statement: the same call with the non-participating features set to 0.
    clean = f.detach().double().clone()
    clean[2, 4] = 0
    clean[0, 1] = 0
    clean[1, 5, 0] = 0
    clean.requires_grad_(True)
    lg64 = lg.detach().double().requires_grad_(True)
    rf, rg = gf_reference(clean, lg64, present, activation, return_gates=True)
    torch.testing.assert_close(fused.double(), rf, **_tol(dtype))
    torch.testing.assert_close(gates.double(), rg, **_tol(dtype))
    rgf, rgl = torch.autograd.grad((rf * w).sum() + rg.sum(), [clean, lg64])
    torch.testing.assert_close(gf.double(), rgf, **_tol(dtype))
    torch.testing.assert_close(gl.double(), rgl, **_tol(dtype))


# ---------------------------------------------------------------- out-of-range lengths
def test_reference_clamps_out_of_range_lengths_like_the_kernels():
    """Where lengths cannot be checked (GPU, torch.compile) the kernels clamp them into
    [0, L]: the reference gives the answer of the clamped lengths too, causal included."""
    torch.manual_seed(13)
    q, keys, values, _ = attention_inputs(3, 6, (9,), 2, 1, 8, 8, torch.float64, "cpu", padded=False)
    wild = dict(kv_lengths=torch.tensor([[40], [-3], [5]]), q_lengths=torch.tensor([2, 99, -1]))
    clamped = dict(kv_lengths=torch.tensor([[9], [0], [5]]), q_lengths=torch.tensor([2, 6, 0]))
    for causal in (False, True):
        out, lse = cross_modal_attention_reference(q, keys, values, **wild, causal=causal, return_lse=True)
        expect, expect_lse = cross_modal_attention_reference(q, keys, values, **clamped, causal=causal, return_lse=True)
        torch.testing.assert_close(out, expect)
        torch.testing.assert_close(lse, expect_lse)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_kernels_clamp_out_of_range_lengths(backend, device):
    """The raw ops (no Python checks in front) against the reference on the same wild lengths."""
    dtype = _dtype_for(backend, device)
    require_backend(backend, device, dtype)
    if backend == "triton":
        mmkernels.ops.load_backend("triton")
    op = torch.ops.mmkernels.triton_cross_modal_attention_fwd if backend == "triton" else torch.ops.mmkernels.cross_modal_attention_fwd
    torch.manual_seed(14)
    q, keys, values, _ = attention_inputs(3, 6, (9,), 2, 1, 8, 8, dtype, device, padded=False)
    kvl = torch.tensor([[40], [-3], [5]], device=device)
    ql = torch.tensor([2, 99, -1], device=device)
    for causal in (False, True):
        out, lse, _ = op(q, keys, values, kvl, ql, None, None, 8**-0.5, causal)
        ref, lse_ref = cross_modal_attention_reference(q.double(), [k.double() for k in keys], [v.double() for v in values],
                                     kv_lengths=kvl, q_lengths=ql, causal=causal, return_lse=True)
        torch.testing.assert_close(out.double(), ref, **_tol(dtype))
        assert torch.equal(lse.isneginf(), lse_ref.isneginf())


# ---------------------------------------------------------------- M = 5..8
@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("M", [5, 6, 7, 8])
def test_many_segments(backend, device, M):
    """Every segment slot up to MAX_SEGMENTS, with lengths (one segment empty), bias, gate, GQA."""
    dtype = _dtype_for(backend, device)
    require_backend(backend, device, dtype)
    torch.manual_seed(stable_seed("many_segments", M))
    Lks = tuple(3 + (5 * m) % 11 for m in range(M))
    q, keys, values, kw = attention_inputs(2, 3, Lks, 4, 2, 8, 8, dtype, device, q_pad=True, bias=True,
                                           gate=True, grad=True)
    kw["kv_lengths"][0, M - 1] = 0
    kw["kv_lengths"][1, M - 1] = Lks[-1]   # the last slot is read, full
    if dtype == torch.float64:  # fp32 bias and gate would get fp32 gradients
        for n in ("modality_bias", "head_gate"):
            kw[n] = kw[n].detach().double().requires_grad_(True)
    _check_attention(backend, q, keys, values, kw)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_gated_fusion_many_modalities(backend, device):
    dtype = _dtype_for(backend, device)
    require_backend(backend, device, dtype, op="gated_fusion")
    torch.manual_seed(15)
    for M in (5, 8):
        f = torch.randn(M, 4, 6, dtype=dtype, device=device, requires_grad=True)
        lg = torch.randn(M, 4, 6, dtype=dtype, device=device, requires_grad=True)
        p = torch.rand(M, 4, device=device) > 0.4
        fused, gates = mmkernels.gated_fusion(f, lg, p, return_gates=True, backend=backend)
        f64, lg64 = _fp64(f, lg)
        rf, rg = gf_reference(f64, lg64, p, return_gates=True)
        torch.testing.assert_close(fused.double(), rf, **_tol(dtype))
        g = torch.autograd.grad(fused.double().square().sum() + gates.double().sum(), [f, lg])
        gr = torch.autograd.grad(rf.square().sum() + rg.sum(), [f64, lg64])
        for a, b in zip(g, gr):
            torch.testing.assert_close(a.double(), b, **_tol(dtype))


# ---------------------------------------------------------------- causal over several key blocks
def _causal_by_definition(q, k, v, kv_len, q_len, scale):
    """fp64 causal attention written out row by row from DESIGN.md 2.1 (not reference.py):
    query i < q_len sees key j < kv_len iff j <= i + kv_len - q_len."""
    B, Lq, Hq, D = q.shape
    G = Hq // k.shape[2]
    out = torch.zeros(B, Lq, Hq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        ql, kl = int(q_len[b]), int(kv_len[b])
        for i in range(ql):
            n = max(0, min(kl, i + 1 + kl - ql))
            if n == 0:
                continue
            for h in range(Hq):
                s = (k[b, :n, h // G].double() @ q[b, i, h].double()) * scale
                out[b, i, h] = torch.softmax(s, 0) @ v[b, :n, h // G].double()
    return out


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=["fp32", "fp16", "bf16"])
def test_causal_over_several_key_blocks(backend, device, dtype):
    """Lq and Lk above the kernels' block sizes (CPU: 64 rows, 256/128 keys), with lengths,
    against an fp64 computation by definition; low precision within the tolerance rule."""
    require_backend(backend, device, dtype)
    big = backend == "cpu"
    B, Lq, Lk = (2, 300, 530) if big else (2, 40, 70)   # the interpreter is slow: smaller there
    torch.manual_seed(stable_seed("causal_blocks", backend, str(dtype)))
    q64 = torch.randn(B, Lq, 2, 16, dtype=torch.float64)
    k64 = torch.randn(B, Lk, 1, 16, dtype=torch.float64)
    v64 = torch.randn(B, Lk, 1, 16, dtype=torch.float64)
    kv_len = torch.tensor([[Lk], [Lk - 61]], dtype=torch.int32)
    q_len = torch.tensor([Lq - 7, Lq], dtype=torch.int64)
    scale = 16**-0.5
    expect = _causal_by_definition(q64, k64, v64, kv_len[:, 0], q_len, scale)
    low = [t.to(dtype) for t in (q64, k64, v64)]
    out = mmkernels.cross_modal_attention(low[0].to(device), [low[1].to(device)], [low[2].to(device)],
                                          kv_lengths=kv_len.to(device), q_lengths=q_len.to(device),
                                          causal=True, backend=backend).cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), expect, atol=1e-4, rtol=2e-4)
    else:
        same_precision = cross_modal_attention_reference(low[0], [low[1]], [low[2]], kv_lengths=kv_len, q_lengths=q_len,
                                       causal=True, upcast=False)
        assert_within_rule(out, expect, same_precision)


# ---------------------------------------------------------------- bias and gate in q's dtype
@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["fp16", "bf16"])
def test_bias_and_gate_in_q_dtype(backend, device, dtype):
    """nn.CrossModalAttention passes modality_bias and head_gate in q's dtype: outputs and
    their gradients (returned in that dtype) within the tolerance rule."""
    require_backend(backend, device, dtype)
    torch.manual_seed(stable_seed("bias_gate_dtype", backend, str(dtype)))
    q, keys, values, kw = attention_inputs(2, 6, (11, 5), 4, 2, 16, 16, torch.float64, device, q_pad=True,
                                           bias=True, gate=True)
    kw["modality_bias"] = kw["modality_bias"].double()
    kw["head_gate"] = kw["head_gate"].double()

    def copy(dt):
        c = lambda t: t.detach().to(dt).requires_grad_(True)  # noqa: E731
        kw2 = dict(kw, modality_bias=c(kw["modality_bias"]), head_gate=c(kw["head_gate"]))
        return c(q), [c(k) for k in keys], [c(v) for v in values], kw2

    x64, xlo, xref = copy(torch.float64), copy(dtype), copy(dtype)
    out = mmkernels.cross_modal_attention(*xlo[:3], **xlo[3], backend=backend)
    assert out.dtype == dtype
    out64 = cross_modal_attention_reference(*x64[:3], **x64[3])
    out_low = cross_modal_attention_reference(*xref[:3], **xref[3], upcast=False)
    assert_within_rule(out, out64, out_low)
    go = torch.randn(out64.shape, dtype=torch.float64, device=device)
    params = lambda x: [x[3]["modality_bias"], x[3]["head_gate"]]  # noqa: E731
    g = torch.autograd.grad(out, params(xlo), go.to(dtype))
    g64 = torch.autograd.grad(out64, params(x64), go)
    glow = torch.autograd.grad(out_low, params(xref), go.to(dtype))
    for name, a, b, c in zip(("grad modality_bias", "grad head_gate"), g, g64, glow):
        assert a.dtype == dtype, name
        assert_within_rule(a, b, c, name=name)


# ---------------------------------------------------------------- empty batches and empty query sets
@pytest.mark.parametrize("backend,device", every_backend())
@pytest.mark.parametrize("empty", ["B0", "Lq0"])
def test_empty_inputs_give_zero_gradients(backend, device, empty):
    dtype = _dtype_for(backend, device)
    require_backend(backend, device, dtype)
    torch.manual_seed(16)
    B, Lq = (0, 5) if empty == "B0" else (2, 0)
    q, keys, values, kw = attention_inputs(B, Lq, (7, 3), 4, 2, 8, 8, dtype, device, bias=True, gate=True,
                                           grad=True)
    out, lse = mmkernels.cross_modal_attention(q, keys, values, **kw, return_lse=True, backend=backend)
    assert out.shape == (B, Lq, 4, 8) and lse.shape == (B, 4, Lq)
    diff = [q, *keys, *values, kw["modality_bias"], kw["head_gate"]]
    grads = torch.autograd.grad((out * 2).sum() + lse.sum(), diff, allow_unused=True)
    for t, g in zip(diff, grads):
        g = torch.zeros_like(t) if g is None else g
        assert g.shape == t.shape and torch.all(g == 0), (t.shape, g)


# ---------------------------------------------------------------- gated fusion: strided, identity
@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("activation", ["tanh", "identity"])
def test_gated_fusion_noncontiguous_with_present_and_grads(backend, device, activation):
    dtype = _dtype_for(backend, device)
    require_backend(backend, device, dtype, op="gated_fusion")
    torch.manual_seed(17)
    base = torch.randn(3, 10, 2, 13, dtype=dtype, device=device, requires_grad=True)
    f, lg = base[:, ::2, 0, 1:], base[:, 1::2, 1, :12]             # (3, 5, 12), strided
    present_base = torch.rand(3, 10, device=device) > 0.3
    present = present_base[:, ::2]
    assert not f.is_contiguous() and not present.is_contiguous()
    fused, gates = mmkernels.gated_fusion(f, lg, present, activation, return_gates=True, backend=backend)
    (b64,) = _fp64(base)
    rf, rg = gf_reference(b64[:, ::2, 0, 1:], b64[:, 1::2, 1, :12], present, activation, return_gates=True)
    torch.testing.assert_close(fused.double(), rf, **_tol(dtype))
    torch.testing.assert_close(gates.double(), rg, **_tol(dtype))
    w = torch.randn(rf.shape, dtype=torch.float64, device=device)
    (g,) = torch.autograd.grad((fused.double() * w).sum() + gates.double().square().sum(), base)
    (gr,) = torch.autograd.grad((rf * w).sum() + rg.square().sum(), b64)
    torch.testing.assert_close(g.double(), gr, **_tol(dtype))


@pytest.mark.parametrize("backend,device", [p for p in every_backend() if p.values[0] == "cpu"])
def test_gated_fusion_gradcheck_identity(backend, device):
    require_backend(backend, device, torch.float64, op="gated_fusion")
    torch.manual_seed(18)
    f = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    lg = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    p = torch.rand(3, 4) > 0.3

    def fn(f, lg):
        return mmkernels.gated_fusion(f, lg, p, "identity", return_gates=True, backend=backend)

    assert torch.autograd.gradcheck(fn, (f, lg))
