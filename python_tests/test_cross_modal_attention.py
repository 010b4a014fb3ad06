"""cross_modal_attention: compiled backends against the reference, and the reference itself."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmkernels
from mmkernels.reference import cross_modal_attention_reference as reference
from utils import (
    LOW_PRECISION,
    assert_within_rule,
    attention_inputs,
    close,
    compiled_backends,
    exact_dtype,
    require_backend,
    stable_seed,
)

# (B, Lq, Lks, Hq, Hkv, D, Dv): odd sizes, Lq != Lk, M = 1..4, GQA and MQA.
SHAPES = [
    (2, 7, (33,), 4, 4, 16, 16),
    (3, 1, (127, 7), 4, 2, 32, 24),
    (2, 33, (1, 1000, 7), 6, 1, 64, 64),
    (1, 64, (200, 300, 50, 9), 8, 4, 64, 32),
]
FEATURES = [
    dict(),
    dict(q_pad=True, bias=True, gate=True),
    dict(noncontig=True, bias=True),
]


def _grads(out, tensors, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    return torch.autograd.grad(out, tensors, grad_out, allow_unused=True), grad_out


def _diff_inputs(q, keys, values, kw):
    extra = [kw[n] for n in ("modality_bias", "head_gate") if n in kw]
    return [q, *keys, *values, *extra]


def _as(dtype, q, keys, values, kw):
    """Detached copies in `dtype` (lengths unchanged; bias/gate stay fp32 for low precision)."""
    conv = lambda t: t.detach().to(dtype).requires_grad_(True)  # noqa: E731
    kw2 = {}
    for n, v in kw.items():
        if n in ("modality_bias", "head_gate"):
            kw2[n] = v.detach().to(dtype if dtype == torch.float64 else torch.float32).requires_grad_(True)
        else:
            kw2[n] = v
    return conv(q), [conv(k) for k in keys], [conv(v) for v in values], kw2


# ---------------------------------------------------------------- reference
def test_reference_matches_per_sample_loop():
    """The reference against the definition written out one sample and head at a time."""
    torch.manual_seed(0)
    q, keys, values, kw = attention_inputs(3, 5, (6, 4), 4, 2, 8, 8, torch.float64, "cpu",
                                           q_pad=True, bias=True, gate=True)
    kw["kv_lengths"][0] = 0  # an all-padded sample
    out, lse = reference(q, keys, values, **kw, return_lse=True)
    scale = 8**-0.5
    for b in range(3):
        for h in range(4):
            ks, vs, bs = [], [], []
            for m, (k, v) in enumerate(zip(keys, values)):
                n = int(kw["kv_lengths"][b, m])
                ks.append(k[b, :n, h // 2]); vs.append(v[b, :n, h // 2])
                bs.append(kw["modality_bias"][h, m].expand(n))
            k, v, bias = torch.cat(ks), torch.cat(vs), torch.cat(bs)
            for i in range(5):
                if i >= int(kw["q_lengths"][b]) or len(k) == 0:
                    assert torch.all(out[b, i, h] == 0) and lse[b, h, i] == float("-inf")
                    continue
                p = torch.softmax(q[b, i, h] @ k.T * scale + bias, dim=0)
                expect = (p @ v) * torch.tanh(kw["head_gate"][h])
                torch.testing.assert_close(out[b, i, h], expect)
                torch.testing.assert_close(lse[b, h, i], torch.logsumexp(q[b, i, h] @ k.T * scale + bias, 0))


def test_reference_causal_is_bottom_right_aligned():
    torch.manual_seed(0)
    q, keys, values, _ = attention_inputs(1, 3, (5,), 1, 1, 4, 4, torch.float64, "cpu", padded=False)
    out = reference(q, keys, values, causal=True)
    # The last query sees all 5 keys, the first sees keys 0..2.
    full = reference(q[:, 2:], keys, values)
    torch.testing.assert_close(out[:, 2:], full)
    first = reference(q[:, :1], [keys[0][:, :3]], [values[0][:, :3]])
    torch.testing.assert_close(out[:, :1], first)


# ---------------------------------------------------------------- backends vs reference
@pytest.mark.parametrize("backend,device", compiled_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("features", FEATURES, ids=["plain", "qpad-bias-gate", "noncontig"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:2])) + f"-M{len(s[2])}-H{s[3]}/{s[4]}")
def test_matches_reference(backend, device, dtype, features, shape):
    require_backend(backend, device, dtype)
    if dtype == torch.float64 and device == "cuda":
        pytest.skip("fp64 runs on cpu and reference only")
    torch.manual_seed(stable_seed(shape, sorted(features)))
    B, Lq, Lks, Hq, Hkv, D, Dv = shape
    q, keys, values, kw = attention_inputs(B, Lq, Lks, Hq, Hkv, D, Dv, dtype, device, grad=True, **features)
    out, lse = mmkernels.cross_modal_attention(q, keys, values, **kw, return_lse=True, backend=backend)
    out_ref, lse_ref = reference(q, keys, values, **kw, return_lse=True)
    close(out, out_ref, dtype)
    close(lse, lse_ref, torch.float64 if dtype == torch.float64 else torch.float32)
    inputs = _diff_inputs(q, keys, values, kw)
    grads, _ = _grads(out, inputs)
    grads_ref, _ = _grads(out_ref, inputs)
    for i, (g, gr) in enumerate(zip(grads, grads_ref)):
        close(g, gr, dtype)


@pytest.mark.parametrize("backend,device", compiled_backends())
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=["M2", "M3", "M4"])
def test_low_precision_within_rule(backend, device, dtype, shape):
    require_backend(backend, device, dtype)
    torch.manual_seed(1)
    B, Lq, Lks, Hq, Hkv, D, Dv = shape
    q, keys, values, kw = attention_inputs(B, Lq, Lks, Hq, Hkv, D, Dv, torch.float64, device,
                                           q_pad=True, bias=True, gate=True)
    x64 = _as(torch.float64, q, keys, values, kw)
    xlo = _as(dtype, q, keys, values, kw)
    xlo_ref = _as(dtype, q, keys, values, kw)
    out64 = reference(*x64[:3], **x64[3])
    out = mmkernels.cross_modal_attention(*xlo[:3], **xlo[3], backend=backend)
    out_low = reference(*xlo_ref[:3], **xlo_ref[3], upcast=False)
    assert_within_rule(out, out64, out_low)
    g64, grad_out = _grads(out64, _diff_inputs(*x64))
    g = torch.autograd.grad(out, _diff_inputs(*xlo), grad_out.to(dtype))
    g_low = torch.autograd.grad(out_low, _diff_inputs(*xlo_ref), grad_out.to(dtype))
    for i, (a, b, c) in enumerate(zip(g, g64, g_low)):
        assert_within_rule(a, b, c, name=f"grad {i}")


@pytest.mark.parametrize("backend,device", compiled_backends())
@pytest.mark.parametrize("causal_shape", [(2, 17, 40, 4, 2), (3, 9, 5, 2, 1)])
def test_causal(backend, device, causal_shape):
    require_backend(backend, device)
    torch.manual_seed(2)
    B, Lq, Lk, Hq, Hkv = causal_shape
    dtype = exact_dtype(device)
    q, keys, values, kw = attention_inputs(B, Lq, (Lk,), Hq, Hkv, 16, 16, dtype, device,
                                           q_pad=True, grad=True)
    out = mmkernels.cross_modal_attention(q, keys, values, **kw, causal=True, backend=backend)
    ref = reference(q, keys, values, **kw, causal=True)
    close(out, ref, dtype)
    g, _ = _grads(out, [q, *keys, *values])
    gr, _ = _grads(ref, [q, *keys, *values])
    for a, b in zip(g, gr):
        close(a, b, dtype)


@pytest.mark.parametrize("backend,device", compiled_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_padded_rows_give_zero_not_nan(backend, device, dtype):
    require_backend(backend, device, dtype)
    torch.manual_seed(3)
    q, keys, values, kw = attention_inputs(3, 6, (9, 4), 4, 2, 16, 16, dtype, device,
                                           q_pad=True, bias=True, gate=True, grad=True)
    kw["kv_lengths"][0] = 0          # sample 0: no valid key at all
    kw["q_lengths"][1] = 2           # sample 1: rows 2.. are padding
    out, lse = mmkernels.cross_modal_attention(q, keys, values, **kw, return_lse=True, backend=backend)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    assert torch.all(out[1, 2:] == 0) and torch.all(lse[1, :, 2:] == float("-inf"))
    grads, _ = _grads(out, [q, *keys, *values])
    for g in grads:
        assert not g.isnan().any()
    assert torch.all(grads[0][0] == 0) and torch.all(grads[0][1, 2:] == 0)
    for gk in grads[1:]:
        assert torch.all(gk[0] == 0)  # nothing attends to sample 0's keys


@pytest.mark.parametrize("backend,device", compiled_backends())
def test_empty_batch_and_empty_segments(backend, device):
    require_backend(backend, device)
    q, keys, values, kw = attention_inputs(0, 5, (7, 3), 4, 2, 8, 8, torch.float32, device, grad=True)
    out = mmkernels.cross_modal_attention(q, keys, values, **kw, backend=backend)
    assert out.shape == (0, 5, 4, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape
    # A segment of length 0 beside a non-empty one.
    dtype = exact_dtype(device)
    q, keys, values, kw = attention_inputs(2, 5, (0, 6), 4, 2, 8, 8, dtype, device)
    close(mmkernels.cross_modal_attention(q, keys, values, **kw, backend=backend),
          reference(q, keys, values, **kw), dtype)


@pytest.mark.parametrize("backend,device", compiled_backends())
def test_grad_of_lse_and_zero_gate(backend, device):
    """lse has a gradient, and a gate at 0 (its init in the model) still trains."""
    require_backend(backend, device)
    torch.manual_seed(4)
    dtype = exact_dtype(device)
    q, keys, values, kw = attention_inputs(2, 5, (9, 6), 4, 2, 8, 8, dtype, device,
                                           bias=True, gate=True, grad=True)
    with torch.no_grad():
        kw["head_gate"][:2] = 0
    inputs = _diff_inputs(q, keys, values, kw)
    out, lse = mmkernels.cross_modal_attention(q, keys, values, **kw, return_lse=True, backend=backend)
    ref, lse_ref = reference(q, keys, values, **kw, return_lse=True)
    loss = (out * 1.5).sum() + torch.where(lse.isfinite(), lse, 0).sum()
    loss_ref = (ref * 1.5).sum() + torch.where(lse_ref.isfinite(), lse_ref, 0).sum()
    grads = torch.autograd.grad(loss, inputs)
    for a, b in zip(grads, torch.autograd.grad(loss_ref, inputs)):
        close(a, b, dtype)
    assert grads[-1][:2].abs().min() > 0  # the zero gates get a gradient


@pytest.mark.parametrize("backend,device", compiled_backends())
def test_opcheck(backend, device):
    require_backend(backend, device)
    torch.manual_seed(5)
    for feats in ({}, dict(q_pad=True, bias=True, gate=True)):
        q, keys, values, kw = attention_inputs(2, 5, (7, 3), 4, 2, 8, 8, torch.float32, device, grad=True, **feats)
        args = (q, keys, values, kw.get("kv_lengths"), kw.get("q_lengths"), kw.get("modality_bias"),
                kw.get("head_gate"), 0.3, False)
        torch.library.opcheck(torch.ops.mmkernels.cross_modal_attention_fwd.default, args)
        out, lse, out_u = torch.ops.mmkernels.cross_modal_attention_fwd(*args)
        saved_out = out_u if kw.get("head_gate") is not None else out
        bwd_args = (torch.randn_like(out), torch.randn_like(lse), q.detach(), [k.detach() for k in keys],
                    [v.detach() for v in values], saved_out.detach(), lse.detach(),
                    *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[3:]])
        torch.library.opcheck(torch.ops.mmkernels.cross_modal_attention_bwd.default, bwd_args)


@pytest.mark.parametrize("backend,device", compiled_backends())
def test_opcheck_causal_and_bf16(backend, device):
    require_backend(backend, device, torch.bfloat16)
    torch.manual_seed(8)
    for Lks, dtype, causal in (((9,), torch.float32, True), ((7, 3), torch.bfloat16, False),
                               ((6,), torch.bfloat16, True)):
        q, keys, values, kw = attention_inputs(2, 5, Lks, 4, 2, 16, 16, dtype, device, q_pad=True, bias=True,
                                               gate=True, grad=True)
        kw["modality_bias"] = kw["modality_bias"].detach().to(dtype).requires_grad_(True)
        args = (q, keys, values, kw["kv_lengths"], kw["q_lengths"], kw["modality_bias"], kw["head_gate"], 0.25,
                causal)
        torch.library.opcheck(torch.ops.mmkernels.cross_modal_attention_fwd.default, args)
        out, lse, out_u = torch.ops.mmkernels.cross_modal_attention_fwd(*args)
        bwd_args = (torch.randn_like(out), torch.randn_like(lse), q.detach(), [k.detach() for k in keys],
                    [v.detach() for v in values], out_u.detach(), lse.detach(),
                    *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[3:]])
        torch.library.opcheck(torch.ops.mmkernels.cross_modal_attention_bwd.default, bwd_args)


@pytest.mark.parametrize("backend,device", [p for p in compiled_backends() if p.values[0] == "cpu"])
def test_gradcheck_fp64(backend, device):
    require_backend(backend, device, torch.float64)
    torch.manual_seed(6)
    q, keys, values, kw = attention_inputs(2, 3, (4, 3), 2, 1, 5, 3, torch.float64, device,
                                           q_pad=True, bias=True, gate=True, grad=True)
    kw["q_lengths"] = torch.tensor([3, 2])
    kw["kv_lengths"] = torch.tensor([[4, 1], [2, 3]])
    for n in ("modality_bias", "head_gate"):  # fp64, or the finite differences are too coarse
        kw[n] = kw[n].detach().double().requires_grad_()
    M = len(keys)

    def f(q, *rest):
        ks, vs, (bias, gate) = list(rest[:M]), list(rest[M : 2 * M]), rest[2 * M :]
        out, lse = mmkernels.cross_modal_attention(
            q, ks, vs, kv_lengths=kw["kv_lengths"], q_lengths=kw["q_lengths"],
            modality_bias=bias, head_gate=gate, return_lse=True, backend=backend)
        return out, torch.where(lse.isfinite(), lse, 0)

    assert torch.autograd.gradcheck(f, tuple(_diff_inputs(q, keys, values, kw)))


@pytest.mark.parametrize("backend,device", compiled_backends())
def test_compile_fullgraph_no_recompile_on_new_lengths(backend, device):
    require_backend(backend, device)
    torch._dynamo.reset()
    torch.manual_seed(7)
    q, keys, values, kw = attention_inputs(2, 5, (7, 6), 4, 2, 8, 8, torch.float32, device,
                                           bias=True, gate=True, grad=True)

    def step(q, k0, k1, v0, v1, kv_lengths, q_lengths, bias, gate):
        out = mmkernels.cross_modal_attention(q, [k0, k1], [v0, v1], kv_lengths=kv_lengths, q_lengths=q_lengths,
                                              modality_bias=bias, head_gate=gate, backend=backend)
        return (out * out).sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    counters = torch._dynamo.utils.counters
    counters.clear()
    for trial in range(3):
        lengths = torch.stack([torch.randint(0, 8, (2,)), torch.randint(0, 7, (2,))], 1).to(device)
        q_lengths = torch.tensor([[5, 2], [0, 5], [3, 4]][trial], device=device)
        args = (q, *keys, *values, lengths, q_lengths, kw["modality_bias"], kw["head_gate"])
        loss = compiled(*args)
        grads = torch.autograd.grad(loss, [q, *keys, *values, kw["modality_bias"], kw["head_gate"]])
        expect = step(*args)
        expect_grads = torch.autograd.grad(expect, [q, *keys, *values, kw["modality_bias"], kw["head_gate"]])
        close(loss, expect, torch.float32)
        for a, b in zip(grads, expect_grads):
            close(a, b, torch.float32)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("backend,device", [p for p in compiled_backends() if p.values[0] == "cpu"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 3), Lq=st.integers(1, 20), M=st.integers(1, 4), group=st.sampled_from([1, 2, 3]),
    Hkv=st.integers(1, 2), D=st.sampled_from([1, 3, 8, 17]), Dv=st.sampled_from([2, 8, 13]),
    Lks=st.lists(st.integers(0, 70), min_size=4, max_size=4), seed=st.integers(0, 2**16),
    q_pad=st.booleans(), bias=st.booleans(), gate=st.booleans(),
)
def test_property_random_shapes_and_lengths(backend, device, B, Lq, M, group, Hkv, D, Dv, Lks, seed,
                                            q_pad, bias, gate):
    require_backend(backend, device, torch.float64)
    torch.manual_seed(seed)
    q, keys, values, kw = attention_inputs(B, Lq, tuple(Lks[:M]), Hkv * group, Hkv, D, Dv, torch.float64,
                                           device, q_pad=q_pad, bias=bias, gate=gate, grad=True)
    out = mmkernels.cross_modal_attention(q, keys, values, **kw, backend=backend)
    ref = reference(q, keys, values, **kw)
    close(out, ref, torch.float64)
    inputs = _diff_inputs(q, keys, values, kw)
    for a, b in zip(_grads(out, inputs)[0], _grads(ref, inputs)[0]):
        close(a, b, torch.float64)
