"""Each bad input raises ValueError/TypeError naming the argument and what was expected."""
import pytest
import torch

import mmkernels
from mmkernels.backends import BackendNotSupported


def _attn(B=2, Lq=3, Hq=4, Hkv=2, D=8, Dv=8, Lks=(5, 6), dtype=torch.float32):
    q = torch.randn(B, Lq, Hq, D, dtype=dtype)
    keys = [torch.randn(B, L, Hkv, D, dtype=dtype) for L in Lks]
    values = [torch.randn(B, L, Hkv, Dv, dtype=dtype) for L in Lks]
    return q, keys, values


def _raises(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


def test_q_rank():
    q, k, v = _attn()
    _raises(ValueError, r"q must have shape \(B, Lq, Hq, D\)", mmkernels.cross_modal_attention, q[0], k, v)


def test_key_rank():
    q, k, v = _attn()
    k[1] = k[1][0]
    _raises(ValueError, r"keys\[1\] must have shape \(B, Lk, Hkv, D\)", mmkernels.cross_modal_attention, q, k, v)


def test_batch_mismatch():
    q, k, v = _attn()
    v[0] = v[0][:1]
    _raises(ValueError, r"values\[0\] has batch 1, expected q's batch 2", mmkernels.cross_modal_attention, q, k, v)


def test_head_mismatch_between_keys():
    q, k, v = _attn()
    k[1] = torch.randn(2, 6, 4, 8)
    _raises(ValueError, r"kv heads", mmkernels.cross_modal_attention, q, k, v)


def test_hq_not_multiple_of_hkv():
    q, k, v = _attn(Hq=3, Hkv=2)
    _raises(ValueError, r"Hq \(3\) must be a multiple of Hkv \(2\)", mmkernels.cross_modal_attention, q, k, v)


def test_head_dim_mismatch():
    q, k, v = _attn()
    k[0] = torch.randn(2, 5, 2, 4)
    _raises(ValueError, r"keys\[0\] must have head dim D=8", mmkernels.cross_modal_attention, q, k, v)


def test_key_value_length_mismatch():
    q, k, v = _attn()
    v[1] = torch.randn(2, 2, 2, 8)
    _raises(ValueError, r"keys\[1\] and values\[1\] must have the same length", mmkernels.cross_modal_attention, q, k, v)


def test_dtype_mismatch():
    q, k, v = _attn()
    k[0] = k[0].double()
    _raises(TypeError, r"keys\[0\] must have q's dtype torch.float32", mmkernels.cross_modal_attention, q, k, v)


def test_unsupported_dtype():
    q, k, v = _attn()
    _raises(TypeError, r"q must have dtype in", mmkernels.cross_modal_attention, q.int(), k, v)


def test_device_mismatch():
    q, k, v = _attn()
    k[0] = k[0].to("meta")
    _raises(ValueError, r"keys\[0\] is on meta", mmkernels.cross_modal_attention, q, k, v)
    q, k, v = _attn()
    meta = dict(device="meta")
    _raises(ValueError, r"kv_lengths is on meta", mmkernels.cross_modal_attention, q, k, v,
            kv_lengths=torch.zeros(2, 2, dtype=torch.int32, **meta))
    _raises(ValueError, r"modality_bias is on meta", mmkernels.cross_modal_attention, q, k, v,
            modality_bias=torch.zeros(4, 2, **meta))
    _raises(ValueError, r"head_gate is on meta", mmkernels.cross_modal_attention, q, k, v,
            head_gate=torch.zeros(4, **meta))
    f = torch.randn(2, 3, 4)
    _raises(ValueError, r"gate_logits is on meta", mmkernels.gated_fusion, f, f.to("meta"))
    _raises(ValueError, r"present is on meta", mmkernels.gated_fusion, f, f,
            present=torch.ones(2, 3, dtype=torch.bool, **meta))


def test_last_dim_not_contiguous():
    q, k, v = _attn()
    q = torch.randn(2, 3, 4, 16)[..., ::2]
    _raises(ValueError, r"q must be contiguous in its last dim", mmkernels.cross_modal_attention, q, k, v)


def test_kv_lengths_out_of_range():
    q, k, v = _attn()
    _raises(ValueError, r"kv_lengths\[1, 1\] = 7 is out of range \[0, 6\]", mmkernels.cross_modal_attention,
            q, k, v, kv_lengths=torch.tensor([[5, 6], [5, 7]]))
    _raises(ValueError, r"kv_lengths\[0, 0\] = -1 is out of range", mmkernels.cross_modal_attention,
            q, k, v, kv_lengths=torch.tensor([[-1, 6], [5, 6]]))


def test_q_lengths_out_of_range():
    q, k, v = _attn()
    _raises(ValueError, r"q_lengths\[0\] = 4 is out of range \[0, 3\]", mmkernels.cross_modal_attention,
            q, k, v, q_lengths=torch.tensor([4, 1]))


def test_lengths_wrong_dtype():
    q, k, v = _attn()
    _raises(TypeError, r"kv_lengths must have dtype int32 or int64, got torch.float32",
            mmkernels.cross_modal_attention, q, k, v, kv_lengths=torch.ones(2, 2))
    _raises(TypeError, r"q_lengths must be an int32 or int64 tensor", mmkernels.cross_modal_attention,
            q, k, v, q_lengths=[3, 3])


def test_lengths_wrong_shape():
    q, k, v = _attn()
    _raises(ValueError, r"kv_lengths must have shape \(2, 2\), got \(2,\)", mmkernels.cross_modal_attention,
            q, k, v, kv_lengths=torch.tensor([5, 6]))


def test_no_modalities():
    q, _, _ = _attn()
    _raises(ValueError, r"between 1 and 8, got 0", mmkernels.cross_modal_attention, q, [], [])


def test_too_many_modalities():
    q, k, v = _attn(Lks=(2,) * 9)
    _raises(ValueError, r"between 1 and 8, got 9", mmkernels.cross_modal_attention, q, k, v)


def test_keys_values_different_m():
    q, k, v = _attn()
    _raises(ValueError, r"same number of modalities, got 2 and 1", mmkernels.cross_modal_attention, q, k, v[:1])


def test_keys_given_as_tensor():
    q, k, v = _attn()
    _raises(TypeError, r"sequences of tensors", mmkernels.cross_modal_attention, q, k[0], v[0])


def test_causal_with_several_modalities():
    q, k, v = _attn()
    _raises(ValueError, r"causal=True needs exactly one modality \(M == 1\), got M=2",
            mmkernels.cross_modal_attention, q, k, v, causal=True)


def test_bias_and_gate_shapes():
    q, k, v = _attn()
    _raises(ValueError, r"modality_bias must have shape \(Hq, M\) = \(4, 2\), got \(4,\)",
            mmkernels.cross_modal_attention, q, k, v, modality_bias=torch.zeros(4))
    _raises(ValueError, r"head_gate must have shape \(Hq,\) = \(4,\), got \(2,\)",
            mmkernels.cross_modal_attention, q, k, v, head_gate=torch.zeros(2))
    _raises(TypeError, r"head_gate must be float32 or q's dtype", mmkernels.cross_modal_attention,
            q, k, v, head_gate=torch.zeros(4, dtype=torch.float64))


def test_unknown_backend():
    q, k, v = _attn()
    _raises(ValueError, r"backend must be one of", mmkernels.cross_modal_attention, q, k, v, backend="tpu")


def test_forced_backend_that_cannot_serve_lists_reasons():
    q, k, v = _attn()
    _raises(BackendNotSupported, r"backend 'cuda' cannot run cross_modal_attention: .*CUDA tensors",
            mmkernels.cross_modal_attention, q, k, v, backend="cuda")


def test_env_forced_backend(monkeypatch):
    q, k, v = _attn()
    monkeypatch.setenv("MMKERNELS_BACKEND", "cuda")
    _raises(BackendNotSupported, r"backend 'cuda' cannot run", mmkernels.cross_modal_attention, q, k, v)
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
    assert mmkernels.cross_modal_attention(q, k, v).shape == (2, 3, 4, 8)


# ---------------------------------------------------------------- gated fusion
def test_gf_shape_mismatch():
    _raises(ValueError, r"gate_logits must have the shape of features \(3, 4, 5\), got \(3, 4, 6\)",
            mmkernels.gated_fusion, torch.randn(3, 4, 5), torch.randn(3, 4, 6))


def test_gf_rank():
    _raises(ValueError, r"features must have shape \(M, \*, H\)", mmkernels.gated_fusion,
            torch.randn(5), torch.randn(5))


def test_gf_dtype():
    _raises(TypeError, r"gate_logits must have features' dtype", mmkernels.gated_fusion,
            torch.randn(2, 4, 5), torch.randn(2, 4, 5, dtype=torch.float64))
    _raises(TypeError, r"features must have dtype in", mmkernels.gated_fusion,
            torch.ones(2, 4, 5, dtype=torch.int64), torch.ones(2, 4, 5, dtype=torch.int64))


def test_gf_present():
    f = torch.randn(2, 4, 5)
    _raises(TypeError, r"present must have dtype bool", mmkernels.gated_fusion, f, f, present=torch.ones(2, 4))
    _raises(ValueError, r"present must have shape \(M, \*\) = \(2, 4\), got \(2, 5\)", mmkernels.gated_fusion,
            f, f, present=torch.ones(2, 5, dtype=torch.bool))


def test_gf_modalities_and_activation():
    _raises(ValueError, r"between 1 and 8, got 9", mmkernels.gated_fusion, torch.randn(9, 2, 3), torch.randn(9, 2, 3))
    _raises(ValueError, r"activation must be one of \['identity', 'tanh'\], got 'relu'", mmkernels.gated_fusion,
            torch.randn(2, 2, 3), torch.randn(2, 2, 3), activation="relu")


# ---------------------------------------------------------------- the remaining messages
@pytest.mark.parametrize("which", ["q", "keys", "values"])
def test_not_a_tensor(which):
    q, k, v = _attn()
    if which == "q":
        _raises(TypeError, r"q must be a tensor \(B, Lq, Hq, D\), got list", mmkernels.cross_modal_attention,
                q.tolist(), k, v)
    elif which == "keys":
        k[1] = k[1].tolist()
        _raises(TypeError, r"keys\[1\] must be a tensor, got list", mmkernels.cross_modal_attention, q, k, v)
    else:
        v[0] = 3.0
        _raises(TypeError, r"values\[0\] must be a tensor, got float", mmkernels.cross_modal_attention, q, k, v)


def test_value_dim_mismatch_between_values():
    q, k, v = _attn()
    v[1] = torch.randn(2, 6, 2, 4)
    _raises(ValueError, r"values\[1\] must have value dim Dv=8 like values\[0\], got 4",
            mmkernels.cross_modal_attention, q, k, v)


def test_key_dtype_differs_from_q():
    q, k, v = _attn()
    k[0] = k[0].double()
    _raises(TypeError, r"keys\[0\] must have q's dtype torch.float32, got torch.float64",
            mmkernels.cross_modal_attention, q, k, v)


def test_bias_and_gate_not_tensors_or_wrong_dtype():
    q, k, v = _attn()
    _raises(TypeError, r"modality_bias must be a tensor of shape \(Hq, M\) = \(4, 2\), got list",
            mmkernels.cross_modal_attention, q, k, v, modality_bias=[[0.0, 0.0]] * 4)
    _raises(TypeError, r"head_gate must be float32 or q's dtype torch.float32, got torch.int64",
            mmkernels.cross_modal_attention, q, k, v, head_gate=torch.zeros(4, dtype=torch.long))
    _raises(TypeError, r"modality_bias must be float32 or q's dtype torch.float32, got torch.float16",
            mmkernels.cross_modal_attention, q, k, v, modality_bias=torch.zeros(4, 2, dtype=torch.half))


def test_lengths_not_a_tensor():
    q, k, v = _attn()
    _raises(TypeError, r"kv_lengths must be an int32 or int64 tensor of shape \(2, 2\), got list",
            mmkernels.cross_modal_attention, q, k, v, kv_lengths=[[5, 6], [5, 6]])


def test_gf_not_tensors():
    f = torch.randn(2, 3, 4)
    _raises(TypeError, r"features must be a tensor \(M, \*, H\), got list", mmkernels.gated_fusion, f.tolist(), f)
    _raises(TypeError, r"gate_logits must be a tensor \(M, \*, H\), got float", mmkernels.gated_fusion, f, 1.0)
    _raises(TypeError, r"present must be a bool tensor of shape \(2, 3\), got list", mmkernels.gated_fusion,
            f, f, present=[[True] * 3] * 2)


def test_gf_logits_dtype():
    f = torch.randn(2, 3, 4)
    _raises(TypeError, r"gate_logits must have features' dtype torch.float32, got torch.float64",
            mmkernels.gated_fusion, f, f.double())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_double_backward_is_an_error_not_a_silent_zero(backend):
    """The fused backward kernels have no derivative: second-order gradients must fail loudly
    (the reference backend, plain PyTorch, has them)."""
    q = torch.randn(2, 3, 2, 8, requires_grad=True)
    k = torch.randn(2, 5, 2, 8, requires_grad=True)
    f = torch.randn(3, 4, 8, requires_grad=True)
    for out, x in ((mmkernels.cross_modal_attention(q, [k], [k], backend=backend), q),
                   (mmkernels.gated_fusion(f, f * 0.5, backend=backend), f)):
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        if backend == "reference":
            (gg,) = torch.autograd.grad(g.sum(), x)
            assert gg.abs().sum() > 0
        else:
            _raises(RuntimeError, r"has no second derivative .* backend='reference'", g.sum().backward)


def test_raw_cpu_op_checks_its_arguments_like_the_cuda_one():
    """torch.ops.mmkernels.* called directly (no Python checks in front): the shared C++ checks
    (csrc/cross_modal_attention_checks.h) name the argument, on CPU as on CUDA."""
    from utils import require_backend

    require_backend("cpu", "cpu")
    op = torch.ops.mmkernels.cross_modal_attention_fwd
    q = torch.randn(2, 3, 4, 8)
    k = torch.randn(2, 5, 2, 8)
    good = (q, [k], [k], None, None, None, None, 0.5, False)
    assert op(*good)[0].shape == (2, 3, 4, 8)
    cases = [
        ((q, [k], [k], torch.ones(2, 1), None, None, None, 0.5, False), r"kv_lengths: expected int32/int64"),
        ((q, [k], [k], torch.ones(2, 2, dtype=torch.int32), None, None, None, 0.5, False), r"kv_lengths: expected \[2, 1\]"),
        ((q, [k], [k], None, torch.ones(3, dtype=torch.long), None, None, 0.5, False), r"q_lengths: expected \[2\]"),
        ((q, [k], [k], None, None, torch.ones(4, 2), None, 0.5, False), r"modality_bias: expected \[4, 1\]"),
        ((q, [k], [k], None, None, None, torch.ones(4, dtype=torch.long), 0.5, False), r"head_gate: expected float32"),
        ((q, [k, k], [k, k], None, None, None, None, 0.5, True), r"causal=True requires exactly one"),
        ((q, [torch.randn(2, 5, 3, 8)], [torch.randn(2, 5, 3, 8)], None, None, None, None, 0.5, False),
         r"Hq \(4\) must be a multiple of Hkv \(3\)"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
