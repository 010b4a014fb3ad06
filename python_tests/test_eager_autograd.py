"""The ops' eager autograd path (ops/_autograd.py): in plain eager autograd the registered op and its
registered formula run under a torch.autograd.Function instead of the dispatcher's autograd wrapper.
The outputs and every gradient must be those of the registered op called directly, bit for bit, and
everything else (no grad, torch.compile) must call the registered op."""
import pytest
import torch

import mmkernels
from mmkernels import backends
from mmkernels.ops import _autograd

pytestmark = pytest.mark.skipif(backends.extension_error() is not None, reason="C++ extension not built")


def _count_eager(monkeypatch):
    calls = []
    real = _autograd._EagerFused.apply

    def counted(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(_autograd._EagerFused, "apply", counted)
    return calls


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("with_extras", [False, True])
def test_attention_same_as_the_registered_op(monkeypatch, with_extras):
    calls = _count_eager(monkeypatch)
    g = torch.Generator().manual_seed(0)
    B, Lq, H, D = 3, 5, 2, 16
    q = torch.randn(B, Lq, H, D, generator=g)
    ks = [torch.randn(B, L, H, D, generator=g) for L in (7, 4)]
    vs = [torch.randn(B, L, H, D, generator=g) for L in (7, 4)]
    bias = torch.randn(H, 2, generator=g) if with_extras else None
    gate = torch.randn(H, generator=g) if with_extras else None
    lengths = torch.tensor([[7, 4], [3, 0], [5, 2]], dtype=torch.int32)
    masks = [torch.rand(B, 7, generator=g) > 0.3, None] if with_extras else None
    grad_out = torch.randn(B, Lq, H, D, generator=g)
    extras = [t for t in (bias, gate) if t is not None]

    def run(direct):
        lq, lk0, lk1, lv0, lv1, *lx = _leaves(q, *ks, *vs, *extras)
        b = lx[0] if with_extras else None
        gt = lx[1] if with_extras else None
        if direct:
            full_masks = None if masks is None else [masks[0], torch.ones(B, 4, dtype=torch.bool)]
            out = torch.ops.mmkernels.cross_modal_attention_fwd(lq, [lk0, lk1], [lv0, lv1], lengths, None, b, gt,
                                                                D ** -0.5, False, full_masks)[0]
        else:
            out = mmkernels.cross_modal_attention(lq, [lk0, lk1], [lv0, lv1], kv_lengths=lengths, modality_bias=b,
                                                  head_gate=gt, kv_masks=masks, backend="cpu")
        grads = torch.autograd.grad(out, [lq, lk0, lk1, lv0, lv1, *lx], grad_out)
        return out, grads

    n = len(calls)
    out_e, grads_e = run(direct=False)
    assert len(calls) == n + 1, "eager autograd should take the Function path"
    out_d, grads_d = run(direct=True)
    assert len(calls) == n + 1
    assert torch.equal(out_e, out_d)
    for a, b in zip(grads_e, grads_d):
        assert torch.equal(a, b)


def test_gated_fusion_same_as_the_registered_op(monkeypatch):
    calls = _count_eager(monkeypatch)
    g = torch.Generator().manual_seed(1)
    f = torch.randn(3, 4, 6, 8, generator=g)
    lg = torch.randn(3, 4, 6, 8, generator=g)
    present = torch.rand(3, 4, 6, generator=g) > 0.3
    go = torch.randn(4, 6, 8, generator=g)
    a, b = _leaves(f, lg)
    out = mmkernels.gated_fusion(a, b, present, backend="cpu")
    ga = torch.autograd.grad(out, [a, b], go)
    assert len(calls) == 1
    c, d = _leaves(f, lg)
    ref = torch.ops.mmkernels.gated_fusion_fwd(c.reshape(3, -1, 8), d.reshape(3, -1, 8), present.reshape(3, -1),
                                               0, False)[0].reshape(4, 6, 8)
    gd = torch.autograd.grad(ref, [c, d], go)
    assert torch.equal(out, ref) and all(torch.equal(x, y) for x, y in zip(ga, gd))


def test_parameters_take_the_function_path(monkeypatch):
    """A model passes its gate and bias parameters as they are (nn.Parameter, a tensor subclass)."""
    calls = _count_eager(monkeypatch)
    q = torch.randn(2, 3, 2, 8, requires_grad=True)
    k = torch.randn(2, 4, 2, 8)
    gate = torch.nn.Parameter(torch.randn(2))
    mmkernels.cross_modal_attention(q, [k], [k], head_gate=gate, backend="cpu").sum().backward()
    assert len(calls) == 1 and gate.grad is not None and q.grad is not None


def test_registered_op_where_the_function_does_not_apply(monkeypatch):
    calls = _count_eager(monkeypatch)
    q = torch.randn(2, 3, 2, 8, requires_grad=True)
    k = torch.randn(2, 4, 2, 8, requires_grad=True)
    with torch.no_grad():
        mmkernels.cross_modal_attention(q, [k], [k], backend="cpu")
    mmkernels.cross_modal_attention(q.detach(), [k.detach()], [k.detach()], backend="cpu")   # nothing needs grad
    f = torch.compile(lambda q, k: mmkernels.cross_modal_attention(q, [k], [k], backend="cpu"), fullgraph=True)
    f(q, k).sum().backward()
    assert not calls and q.grad is not None


def test_double_backward_still_refused():
    q = torch.randn(2, 3, 2, 8, requires_grad=True)
    k = torch.randn(2, 4, 2, 8, requires_grad=True)
    out = mmkernels.cross_modal_attention(q, [k], [k], backend="cpu")
    (gq,) = torch.autograd.grad(out.sum(), [q], create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        gq.sum().backward()


def test_flatten_round_trips_the_op_arguments():
    """The eager path's own flattening: tensors, None, scalars and per-segment lists (masks with a None
    entry, a missing kv_masks), the gradients' structure too."""
    t = [torch.randn(2) for _ in range(5)]
    for args in [(t[0], [t[1], t[2]], [t[3], t[4]], None, None, None, None, 0.5, False, None),
                 (t[0], [t[1]], [t[2]], t[3], None, t[4], None, 0.25, True, [t[1] > 0, None]),
                 (None, [None, None], [None], None, 1.0)]:
        flat, spec = _autograd._flatten(args)
        assert all(not isinstance(x, (list, tuple)) for x in flat)
        back = _autograd._unflatten(flat, spec)
        assert len(back) == len(args)
        for a, b in zip(args, back):
            if isinstance(a, list):
                assert isinstance(b, list) and len(a) == len(b) and all(x is y for x, y in zip(a, b))
            else:
                assert a is b


def test_inference_below_the_autograd_wrapper_keeps_tracing_and_results():
    """No grad to record: plain eager calls run the kernel below the dispatcher's autograd wrapper, with
    the registered op's results; fake tensors (their dispatch key lies below autograd) still trace it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    wrapped = []  # the dispatcher's Python autograd wrapper hands a call on through OpOverload.redispatch
    real_redispatch = torch._ops.OpOverload.redispatch

    def counted_redispatch(self, *args, **kwargs):
        wrapped.append(self)
        return real_redispatch(self, *args, **kwargs)

    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 2, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 5, 2, 8, generator=g)
    lengths = torch.tensor([[5], [2]])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch._ops.OpOverload, "redispatch", counted_redispatch)
        with torch.no_grad():
            out = mmkernels.cross_modal_attention(q, [k], [k], kv_lengths=lengths, backend="cpu")
        mmkernels.cross_modal_attention(q.detach(), [k], [k], backend="cpu")  # grad on, nothing requires it
        if _autograd.FAST_PATHS:
            assert not wrapped, "inference should run below the autograd wrapper"
    ref = torch.ops.mmkernels.cross_modal_attention_fwd(q, [k], [k], lengths, None, None, None, 8 ** -0.5, False,
                                                        None)[0]
    assert torch.equal(out, ref) and not out.requires_grad
    mode = FakeTensorMode()
    fq, fk = mode.from_tensor(q.detach()), mode.from_tensor(k)
    with mode:
        fout = mmkernels.cross_modal_attention(fq, [fk], [fk], backend="cpu")
    assert type(fout).__name__ == "FakeTensor" and fout.shape == (2, 3, 2, 8)


def test_a_torch_without_the_private_pieces_takes_the_registered_op(monkeypatch):
    """Another torch version may lack the private APIs of the fast paths: then every call goes through the
    registered op, with the same results and gradients."""
    import types
    assert _autograd.fast_paths_available()
    assert not _autograd.fast_paths_available(types.SimpleNamespace(_AutoDispatchBelowAutograd=object))
    calls = _count_eager(monkeypatch)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 2, 8, generator=g)
    k = torch.randn(2, 5, 2, 8, generator=g)
    grad = torch.randn(2, 3, 2, 8, generator=g)

    def run():
        lq, lk = _leaves(q, k)
        out = mmkernels.cross_modal_attention(lq, [lk], [lk], backend="cpu")
        return (out, *torch.autograd.grad(out, [lq, lk], grad))

    fast = run()
    assert len(calls) == 1
    monkeypatch.setattr(_autograd, "FAST_PATHS", False)
    slow = run()
    with torch.no_grad():
        slow_inference = mmkernels.cross_modal_attention(q, [k], [k], backend="cpu")
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(fast, slow)) and torch.equal(slow_inference, fast[0])
