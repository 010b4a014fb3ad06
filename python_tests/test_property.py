"""Property-based tests of both ops against the fp64 reference (hypothesis).

Random shapes (B and Lq may be 0), M = 1..8, GQA ratios, lengths (0, full or any),
q padding, bias, gate, causal, dtypes; every backend that runs here. The profile in
conftest.py fixes the examples (derandomize) and the counts below bound them, so CI
time is predictable and a failure prints an example that reproduces anywhere.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmkernels
from mmkernels.reference import cross_modal_attention_reference
from mmkernels.reference import gated_fusion_reference as gf_reference
from utils import LOW_PRECISION, assert_within_rule, exact_dtype, kernel_backends, require_backend

def _examples(backend):
    # the Triton interpreter runs each kernel as Python: fewer examples there
    return 25 if backend == "triton" and not torch.cuda.is_available() else 80


def _dtypes(backend, device):
    exact = exact_dtype(device) if backend == "cpu" else torch.float32
    return st.sampled_from([exact, exact, *LOW_PRECISION])


@st.composite
def attention_case(draw, backend, device):
    dtype = draw(_dtypes(backend, device))
    B = draw(st.integers(0, 3))
    Lq = draw(st.integers(0, 12))
    causal = draw(st.booleans())
    M = 1 if causal else draw(st.integers(1, 8))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 2, 3]))
    D = draw(st.sampled_from([1, 4, 8, 17, 32]))
    Dv = draw(st.sampled_from([2, 8, 13]))
    Lks = draw(st.lists(st.integers(0, 40), min_size=M, max_size=M))
    lengths = draw(st.sampled_from(["none", "random", "zero", "full"]))
    return dict(dtype=dtype, B=B, Lq=Lq, M=M, Hkv=Hkv, Hq=Hkv * G, D=D, Dv=Dv, Lks=Lks, lengths=lengths,
                causal=causal, q_pad=draw(st.booleans()), bias=draw(st.sampled_from([None, "random", "neg_inf"])),
                gate=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def _attention_inputs(c, device):
    g = torch.Generator().manual_seed(c["seed"])
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q = r(c["B"], c["Lq"], c["Hq"], c["D"])
    keys = [r(c["B"], L, c["Hkv"], c["D"]) for L in c["Lks"]]
    values = [r(c["B"], L, c["Hkv"], c["Dv"]) for L in c["Lks"]]
    kw = {}
    if c["lengths"] != "none":
        cols = []
        for L in c["Lks"]:
            if c["lengths"] == "random":
                cols.append(torch.randint(0, L + 1, (c["B"],), generator=g))
            else:
                cols.append(torch.full((c["B"],), 0 if c["lengths"] == "zero" else L))
        kw["kv_lengths"] = torch.stack(cols, 1).to(torch.int32) if cols else None
    if c["q_pad"]:
        kw["q_lengths"] = torch.randint(0, c["Lq"] + 1, (c["B"],), generator=g)
    if c["bias"]:
        kw["modality_bias"] = r(c["Hq"], c["M"])
        if c["bias"] == "neg_inf":  # some (head, modality) pairs masked out, some heads entirely
            kw["modality_bias"][torch.rand(c["Hq"], c["M"], generator=g) < 0.4] = float("-inf")
            kw["modality_bias"][0] = float("-inf")  # head 0 sees no key at all
    if c["gate"]:
        kw["head_gate"] = r(c["Hq"])
    kw = {n: t.to(device) for n, t in kw.items()}
    return q.to(device), [k.to(device) for k in keys], [v.to(device) for v in values], kw


def _as(dtype, q, keys, values, kw):
    c = lambda t, dt=dtype: t.detach().to(dt).requires_grad_(True)  # noqa: E731
    p_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    kw2 = {n: (c(t, p_dtype) if n in ("modality_bias", "head_gate") else t) for n, t in kw.items()}
    return c(q), [c(k) for k in keys], [c(v) for v in values], kw2


def _diff(q, keys, values, kw):
    return [q, *keys, *values, *[kw[n] for n in ("modality_bias", "head_gate") if n in kw]]


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_attention_properties(backend, device):
    require_backend(backend, device)

    @settings(max_examples=_examples(backend))
    @given(c=attention_case(backend, device))
    def check(c):
        dtype = c["dtype"]
        base = _attention_inputs(c, device)
        x = _as(dtype, *base)
        out, lse = mmkernels.cross_modal_attention(*x[:3], **x[3], causal=c["causal"], return_lse=True,
                                                   backend=backend)
        assert out.dtype == dtype and out.shape == (c["B"], c["Lq"], c["Hq"], c["Dv"])
        x64 = _as(torch.float64, *base)
        ref, lse_ref = cross_modal_attention_reference(*x64[:3], **x64[3], causal=c["causal"], return_lse=True)
        assert torch.equal(lse.isneginf(), lse_ref.isneginf())
        go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
        grads = torch.autograd.grad(out, _diff(*x), go.to(dtype), allow_unused=True)
        grads_ref = torch.autograd.grad(ref, _diff(*x64), go, allow_unused=True)
        if dtype in LOW_PRECISION:
            xl = _as(dtype, *base)
            low = cross_modal_attention_reference(*xl[:3], **xl[3], causal=c["causal"], upcast=False)
            assert_within_rule(out, ref, low)
            grads_low = torch.autograd.grad(low, _diff(*xl), go.to(dtype), allow_unused=True)
            for i, (a, b, l) in enumerate(zip(grads, grads_ref, grads_low)):
                if a is not None:
                    assert_within_rule(a, b, l, name=f"grad {i}", precision=dtype)
            return
        tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=2e-4)
        torch.testing.assert_close(out.double(), ref, **tol)
        torch.testing.assert_close(torch.where(lse.isfinite(), lse, 0).double(),
                                   torch.where(lse_ref.isfinite(), lse_ref, 0), **tol)
        for i, (a, b) in enumerate(zip(grads, grads_ref)):
            if a is None or b is None:
                assert (a is None or not a.any()) and (b is None or not b.any()), f"grad {i}"
                continue
            torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"grad {i}: {m}")

    check()


@st.composite
def gated_fusion_case(draw, backend, device):
    M = draw(st.integers(1, 8))
    lead = draw(st.lists(st.integers(0, 9), min_size=0, max_size=2))
    return dict(dtype=draw(_dtypes(backend, device)), M=M, lead=lead, H=draw(st.integers(1, 40)),
                present=draw(st.sampled_from(["none", "random", "none_present"])),
                neg_inf_logits=draw(st.booleans()),
                activation=draw(st.sampled_from(["tanh", "identity"])), return_gates=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_gated_fusion_properties(backend, device):
    require_backend(backend, device, op="gated_fusion")

    @settings(max_examples=_examples(backend))
    @given(c=gated_fusion_case(backend, device))
    def check(c):
        dtype, M, lead, H = c["dtype"], c["M"], c["lead"], c["H"]
        g = torch.Generator().manual_seed(c["seed"])
        f64 = (torch.randn(M, *lead, H, generator=g, dtype=torch.float64) * 2).to(device)
        l64 = (torch.randn(M, *lead, H, generator=g, dtype=torch.float64) * 2).to(device)
        if c["neg_inf_logits"]:  # -inf logits, at some units for every modality
            l64[torch.rand(l64.shape, generator=g).to(device) < 0.5] = float("-inf")
            l64[..., 0] = float("-inf")  # unit 0: every logit -inf
        present = None
        if c["present"] != "none":
            present = (torch.rand(M, *lead, generator=g) > 0.3).to(device)
            if c["present"] == "none_present" and present.numel():
                present.view(M, -1)[:, 0] = False
        x = [t.detach().to(dtype).requires_grad_(True) for t in (f64, l64)]
        x64 = [t.detach().clone().requires_grad_(True) for t in (f64, l64)]
        res = mmkernels.gated_fusion(*x, present, c["activation"], return_gates=c["return_gates"], backend=backend)
        ref = gf_reference(*x64, present, c["activation"], return_gates=c["return_gates"])
        res = res if c["return_gates"] else (res,)
        ref = ref if c["return_gates"] else (ref,)
        gw = torch.Generator().manual_seed(2)
        ws = [torch.randn(r.shape, generator=gw, dtype=torch.float64).to(device) for r in ref]
        loss = sum((a.double() * w).sum() for a, w in zip(res, ws))
        loss_ref = sum((a * w).sum() for a, w in zip(ref, ws))
        grads = torch.autograd.grad(loss, x, allow_unused=True)
        grads_ref = torch.autograd.grad(loss_ref, x64, allow_unused=True)
        if dtype in LOW_PRECISION:
            xl = [t.detach().to(dtype).requires_grad_(True) for t in (f64, l64)]
            low = gf_reference(*xl, present, c["activation"], return_gates=c["return_gates"], upcast=False)
            low = low if c["return_gates"] else (low,)
            for a, b, l in zip(res, ref, low):
                assert_within_rule(a, b, l)
            loss_low = sum((a * w.to(dtype)).sum() for a, w in zip(low, ws))
            grads_low = torch.autograd.grad(loss_low, xl, allow_unused=True)
            for i, (a, b, l) in enumerate(zip(grads, grads_ref, grads_low)):
                if a is not None and b is not None and l is not None:
                    assert_within_rule(a, b, l, name=f"grad {i}")
            return
        tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
        for a, b in zip(res, ref):
            torch.testing.assert_close(a.double(), b, **tol)
        for a, b in zip(grads, grads_ref):
            if a is not None and b is not None:
                torch.testing.assert_close(a.double(), b, **tol)

    check()
