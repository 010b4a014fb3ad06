"""The CPU kernels at every instruction-set level this machine runs (baseline, avx2, avx512), against
the fp64 reference under the tolerance rule: the explicitly vectorised fp32 kernels (gated fusion
both ways, the attention rows) are compiled once per level and chosen at run time, so each level is
code of its own and is tested as such. Also: the level is chosen from the CPU, MMKERNELS_CPU_ISA
forces one and refuses what the CPU lacks, and info says which runs."""
import os
import subprocess
import sys

import pytest
import torch

import mmkernels
from mmkernels import backends
from mmkernels.reference import cross_modal_attention_reference, gated_fusion_reference
from utils import assert_within_rule, require_backend

LEVELS = backends.cpu_isa_levels_here() or ("baseline",)


@pytest.fixture
def at_level(request):
    require_backend("cpu", "cpu")
    before = backends.cpu_isa()
    backends.cpu_isa(request.param)
    yield request.param
    backends.cpu_isa(before)


def _tol():
    return dict(atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("at_level", LEVELS, indirect=True)
@pytest.mark.parametrize("M,N,H", [(3, 37, 70), (1, 5, 3), (8, 4, 33), (4, 9, 16)])
@pytest.mark.parametrize("activation", ["tanh", "identity"])
def test_gated_fusion_every_level(at_level, M, N, H, activation):
    """H not a multiple of any vector width (tails), M = 1 and the largest M (8), absent
    modalities, -inf logits and NaN features of non-participants."""
    assert backends.cpu_isa() == at_level
    g = torch.Generator().manual_seed(M * 100 + N * 10 + H)
    f = torch.randn(M, N, H, generator=g, dtype=torch.float64) * 3
    lg = torch.randn(M, N, H, generator=g, dtype=torch.float64) * 2
    present = torch.rand(M, N, generator=g) < 0.7
    present[:, 0] = False  # a position with nothing present
    if M > 1:
        lg[1, :, : H // 2] = float("-inf")
        f[0, ~present[0]] = float("nan")  # features of an absent modality never reach anything
    gates_w = torch.randn(M, N, H, generator=g, dtype=torch.float64)
    grad = torch.randn(N, H, generator=g, dtype=torch.float64)
    f32, l32 = (t.float().requires_grad_(True) for t in (f, lg))
    out, gates = mmkernels.gated_fusion(f32, l32, present, activation=activation, return_gates=True, backend="cpu")
    f64, l64 = (t.clone().requires_grad_(True) for t in (f, lg))
    ref, ref_gates = gated_fusion_reference(f64, l64, present, activation=activation, return_gates=True)
    torch.testing.assert_close(out.double(), ref, **_tol())
    torch.testing.assert_close(gates.double(), ref_gates, **_tol())
    loss = (out.double() * grad).sum() + (gates.double() * gates_w).sum()
    loss_ref = (ref * grad).sum() + (ref_gates * gates_w).sum()
    got = torch.autograd.grad(loss, [f32, l32])
    want = torch.autograd.grad(loss_ref, [f64, l64])
    for a, b in zip(got, want):
        assert not a.isnan().any()
        torch.testing.assert_close(a.double(), torch.nan_to_num(b, nan=0.0), **_tol())


@pytest.mark.parametrize("at_level", LEVELS, indirect=True)
def test_gated_fusion_tanh_edges_every_level(at_level):
    """One modality (gate 1), so the output is the level's tanh itself: a participant's NaN stays NaN,
    +-inf and beyond the rational's clamp give exactly +-1, tiny values pass through,
    and over a dense range the relative error stays within 4e-7 of tanh's."""
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-6, -1e-30, 9.0, 9.5, -40.0,
                      3e38, -3e38])
    dense = torch.linspace(-12, 12, 240001)
    f = torch.cat([x, dense]).reshape(1, 1, -1)  # 240013 columns: a tail at every width
    out = mmkernels.gated_fusion(f, torch.zeros_like(f), backend="cpu")[0, : f.shape[-1]].reshape(-1)
    head, body = out[: len(x)], out[len(x):]
    assert head[0].isnan()
    assert head[1:3].tolist() == [1.0, -1.0]
    assert head[3] == 0 and head[4] == 0  # (-0's sign does not survive the sum over modalities, 0 + -0)
    assert head[5] == torch.tensor(1e-6) and head[6] == torch.tensor(-1e-30)
    assert head[7:].tolist() == [1.0, 1.0, -1.0, 1.0, -1.0]
    want = torch.tanh(dense.double())
    assert ((body.double() - want).abs() <= 4e-7 * want.abs().clamp_min(1e-30)).all()
    assert body.abs().max() <= 1.0


@pytest.mark.parametrize("at_level", LEVELS, indirect=True)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_every_level(at_level, causal):
    """fp32 attention (the rows' max, exp and the backward's exp/dS run at the level) with lengths,
    key masks, bias and several key blocks, forward and every gradient."""
    g = torch.Generator().manual_seed(7 + causal)
    B, Lq, Hq, Hkv, D = 2, 19, 4, 2, 24
    Lks = (300,) if causal else (300, 37)
    q = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    keys = [torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64) for L in Lks]
    values = [torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64) for L in Lks]
    masks = [torch.rand(B, L, generator=g) < 0.8 for L in Lks]
    lengths = torch.tensor([[L - 5 * i for L in Lks] for i in range(B)])
    kw = dict(kv_lengths=lengths, kv_masks=masks, causal=causal)
    leaves32 = [t.float().requires_grad_(True) for t in (q, *keys, *values)]
    leaves64 = [t.clone().requires_grad_(True) for t in (q, *keys, *values)]
    M = len(Lks)
    out = mmkernels.cross_modal_attention(leaves32[0], leaves32[1 : 1 + M], leaves32[1 + M :], **kw, backend="cpu")
    ref = cross_modal_attention_reference(leaves64[0], leaves64[1 : 1 + M], leaves64[1 + M :], **kw)
    torch.testing.assert_close(out.double(), ref, **_tol())
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out.double(), leaves32, go), torch.autograd.grad(ref, leaves64, go)):
        torch.testing.assert_close(a.double(), b, **_tol())


def _within_rule_with_grads(out, ref, ref_low, leaves, leaves64, leaves_ref_low, g):
    """The output and every gradient (for one random output gradient) within DESIGN's tolerance rule:
    against the fp64 reference, with the reference in the inputs' own precision as the yardstick.
    Returns the gradients of `leaves`."""
    assert_within_rule(out, ref, ref_low)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, go.to(out.dtype))
    grads64 = torch.autograd.grad(ref, leaves64, go)
    grads_low = torch.autograd.grad(ref_low, leaves_ref_low, go.to(out.dtype))
    for i, (a, b, c) in enumerate(zip(grads, grads64, grads_low)):
        assert_within_rule(a, b, c, name=f"grad {i}")
    return grads


# Shapes that reach every remainder of the register tiles at every width (4, 8, 16 floats): query
# rows (positions x grouped heads) below, at and past a vector and past a row block of 64, head dims
# of 1 to past a tile of 6 outputs and not whole vectors, keys past a block of 128 and short of a
# tile, a segment's bias of -inf, half inputs; forward and every gradient.
@pytest.mark.parametrize("at_level", LEVELS, indirect=True)
@pytest.mark.parametrize(
    "Lq,Hq,Hkv,D,Dv,Lks,dtype",
    [
        (1, 1, 1, 1, 1, (1,), torch.float32),
        (5, 3, 1, 7, 29, (131, 4), torch.float32),
        (17, 2, 2, 64, 70, (257,), torch.float32),
        (70, 1, 1, 33, 16, (13, 140), torch.float32),
        (40, 8, 2, 16, 6, (129,), torch.float16),
        # key and value gradients past 8 MiB: pages populated up front, rows written by streaming stores
        (3, 2, 2, 64, 64, (20000, 300), torch.float32),
    ],
)
def test_attention_tiles_every_level(at_level, Lq, Hq, Hkv, D, Dv, Lks, dtype):
    g = torch.Generator().manual_seed(Lq * 1000 + D)
    B, M = 2, len(Lks)
    q = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    keys = [torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64) for L in Lks]
    values = [torch.randn(B, L, Hkv, Dv, generator=g, dtype=torch.float64) for L in Lks]
    bias = torch.randn(Hq, M, generator=g, dtype=torch.float64)
    bias[0, 0] = float("-inf")
    q_lengths = torch.tensor([Lq, max(1, Lq - 3)])
    leaves64 = [t.requires_grad_(True) for t in (q, *keys, *values)]
    leaves_low = [t.detach().to(dtype).requires_grad_(True) for t in leaves64]
    leaves_ref_low = [t.detach().to(dtype).requires_grad_(True) for t in leaves64]
    bias64, bias32, bias_ref32 = (bias.requires_grad_(True), bias.detach().float().requires_grad_(True),
                                  bias.detach().float().requires_grad_(True))
    leaves64.append(bias64), leaves_low.append(bias32), leaves_ref_low.append(bias_ref32)
    out = mmkernels.cross_modal_attention(leaves_low[0], leaves_low[1 : 1 + M], leaves_low[1 + M : 1 + 2 * M],
                                          modality_bias=bias32, q_lengths=q_lengths, backend="cpu")
    ref = cross_modal_attention_reference(leaves64[0], leaves64[1 : 1 + M], leaves64[1 + M : 1 + 2 * M],
                                          modality_bias=bias64, q_lengths=q_lengths)
    ref_low = cross_modal_attention_reference(leaves_ref_low[0], leaves_ref_low[1 : 1 + M],
                                              leaves_ref_low[1 + M : 1 + 2 * M], modality_bias=bias_ref32,
                                              q_lengths=q_lengths, upcast=False)
    _within_rule_with_grads(out, ref, ref_low, leaves_low, leaves64, leaves_ref_low, g)


# Key masks with many holes: the forward gathers a segment's kept keys into packed blocks (more than one
# block of 128 here, next to a segment with few holes that is not gathered), half inputs converted as
# they are packed, padded query rows, bias and gate; forward and every gradient.
@pytest.mark.parametrize("at_level", LEVELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_gathers_the_keys_of_masks_with_holes(at_level, dtype):
    g = torch.Generator().manual_seed(11)
    B, Lq, Hq, Hkv, D, Lks = 3, 9, 4, 2, 40, (300, 50)
    q = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    keys = [torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64) for L in Lks]
    values = [torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64) for L in Lks]
    masks = [torch.rand(B, 300, generator=g) < 0.6, torch.rand(B, 50, generator=g) < 0.97]
    masks[0][2] = False  # a sample with no key in the first segment
    kw = dict(kv_masks=masks, q_lengths=torch.tensor([Lq, 4, 1]),
              kv_lengths=torch.tensor([[300, 50], [280, 49], [300, 50]]))
    bias = torch.randn(Hq, 2, generator=g, dtype=torch.float64)
    gate = torch.rand(Hq, generator=g, dtype=torch.float64)
    leaves64 = [t.requires_grad_(True) for t in (q, *keys, *values, bias, gate)]
    leaves_low = [t.detach().to(dtype if i < 5 else torch.float32).requires_grad_(True) for i, t in enumerate(leaves64)]
    leaves_ref = [t.detach().clone().requires_grad_(True) for t in leaves_low]

    def run(fn, ls, **extra):
        return fn(ls[0], ls[1:3], ls[3:5], modality_bias=ls[5], head_gate=ls[6], **kw, **extra)

    out = run(mmkernels.cross_modal_attention, leaves_low, backend="cpu")
    ref = run(cross_modal_attention_reference, leaves64)
    ref_low = run(cross_modal_attention_reference, leaves_ref, upcast=False)
    _within_rule_with_grads(out, ref, ref_low, leaves_low, leaves64, leaves_ref, g)


# Wide heads (D + Dv past 128 floats) take key blocks of 64 in the forward: lengths that end inside
# and on a block, key masks with holes (kept keys gathered into blocks of 64), causal offsets.
@pytest.mark.parametrize("at_level", LEVELS, indirect=True)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_key_blocks_of_wide_heads(at_level, causal):
    g = torch.Generator().manual_seed(13 + causal)
    B, Lq, Hq, Hkv, D, Dv = 2, 21, 2, 1, 128, 96
    Lks = (200,) if causal else (200, 64)
    q = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    keys = [torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64) for L in Lks]
    values = [torch.randn(B, L, Hkv, Dv, generator=g, dtype=torch.float64) for L in Lks]
    masks = [torch.rand(B, L, generator=g) < (0.95 if causal else 0.6) for L in Lks]
    lengths = torch.tensor([list(Lks), [L - 64 if L > 64 else L - 1 for L in Lks]])
    kw = dict(kv_lengths=lengths, kv_masks=masks, causal=causal)
    leaves64 = [t.requires_grad_(True) for t in (q, *keys, *values)]
    leaves32 = [t.detach().float().requires_grad_(True) for t in leaves64]
    leaves_ref = [t.detach().clone().requires_grad_(True) for t in leaves32]
    M = len(Lks)

    def run(fn, ls, **extra):
        return fn(ls[0], ls[1 : 1 + M], ls[1 + M :], **kw, **extra)

    out = run(mmkernels.cross_modal_attention, leaves32, backend="cpu")
    ref = run(cross_modal_attention_reference, leaves64)
    ref_low = run(cross_modal_attention_reference, leaves_ref, upcast=False)
    _within_rule_with_grads(out, ref, ref_low, leaves32, leaves64, leaves_ref, g)


def _run_mask(L, first, end):
    mask = torch.zeros(L, dtype=torch.bool)
    mask[first:end] = True
    return mask


# Key masks that keep one run of keys (right padding, left padding, both, none, a run inside one block
# or past a length) are served as a range of positions [first_key, key_end), with no per-key bias and no
# gather: forward and every gradient, the masked keys' grads zero, causal (bottom-right, offsets from the
# lengths) included; fp32 at every level and the fp64 path.
@pytest.mark.parametrize("at_level", LEVELS, indirect=True)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_serves_masks_that_keep_one_run(at_level, causal):
    _check_masks_that_keep_one_run(causal, torch.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_fp64_serves_masks_that_keep_one_run(causal):
    require_backend("cpu", "cpu")
    _check_masks_that_keep_one_run(causal, torch.float64)


def _check_masks_that_keep_one_run(causal, dtype):
    g = torch.Generator().manual_seed(12 + causal)
    B, Hq, Hkv, D = 4, 4, 2, 24
    Lks = (300,) if causal else (300, 40)
    Lq = 150 if causal else 7
    runs = [[(0, 210), (90, 300), (130, 140), (0, 0)], [(0, 40), (3, 40), (0, 12), (5, 33)]]
    masks = [torch.stack([_run_mask(L, *runs[m][b]) for b in range(B)]) for m, L in enumerate(Lks)]
    kv_lengths = torch.tensor([[300, 40], [250, 40], [300, 20], [300, 40]])[:, : len(Lks)]
    kw = dict(kv_masks=masks, kv_lengths=kv_lengths, causal=causal,
              q_lengths=torch.tensor([Lq, Lq - 5, Lq, 3]) if causal else torch.tensor([Lq, 4, 7, 1]))
    q = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    keys = [torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64) for L in Lks]
    values = [torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64) for L in Lks]
    M = len(Lks)
    leaves64 = [t.requires_grad_(True) for t in (q, *keys, *values)]
    leaves_low = [t.detach().to(dtype).requires_grad_(True) for t in leaves64]
    leaves_ref = [t.detach().clone().requires_grad_(True) for t in leaves_low]

    def run(fn, ls, **extra):
        return fn(ls[0], ls[1 : 1 + M], ls[1 + M :], **kw, **extra)

    out = run(mmkernels.cross_modal_attention, leaves_low, backend="cpu")
    ref = run(cross_modal_attention_reference, leaves64)
    ref_low = run(cross_modal_attention_reference, leaves_ref, upcast=False)
    grads = _within_rule_with_grads(out, ref, ref_low, leaves_low, leaves64, leaves_ref, g)
    for m, mask in enumerate(masks):  # the keys each mask hides get exactly zero gradients
        for grad in (grads[1 + m], grads[1 + M + m]):
            assert not grad[~mask].any()


# A key mask that hides a whole key block inside a segment (too few keys masked to gather them, two
# runs): the backward skips that block, and its keys' gradients are zero, not a neighbour's.
@pytest.mark.parametrize("at_level", LEVELS, indirect=True)
def test_attention_backward_of_a_fully_masked_key_block(at_level):
    g = torch.Generator().manual_seed(14)
    B, Lq, Hq, Hkv, D, Lk = 2, 5, 2, 1, 16, 1100
    mask = torch.ones(B, Lk, dtype=torch.bool)
    mask[:, 128:256] = False
    mask[1, 700:705] = False
    q = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Lk, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Lk, Hkv, D, generator=g, dtype=torch.float64)
    leaves64 = [t.requires_grad_(True) for t in (q, k, v)]
    leaves_low = [t.detach().float().requires_grad_(True) for t in leaves64]
    leaves_ref = [t.detach().clone().requires_grad_(True) for t in leaves_low]

    def run(fn, ls, **extra):
        return fn(ls[0], [ls[1]], [ls[2]], kv_masks=[mask], **extra)

    out = run(mmkernels.cross_modal_attention, leaves_low, backend="cpu")
    ref = run(cross_modal_attention_reference, leaves64)
    ref_low = run(cross_modal_attention_reference, leaves_ref, upcast=False)
    _, dk, dv = _within_rule_with_grads(out, ref, ref_low, leaves_low, leaves64, leaves_ref, g)
    assert not dk[:, 128:256].any() and not dv[:, 128:256].any()


def test_levels_are_ordered_and_the_best_is_chosen():
    require_backend("cpu", "cpu")
    assert LEVELS[0] == "baseline"
    assert set(LEVELS) <= set(backends.CPU_ISA_LEVELS)
    if "MMKERNELS_CPU_ISA" not in os.environ:
        env = {k: v for k, v in os.environ.items() if k != "MMKERNELS_CPU_ISA"}
        r = subprocess.run([sys.executable, "-c", "from mmkernels import backends; print(backends.cpu_isa())"],
                           capture_output=True, text=True, env=env)
        assert r.stdout.strip() == LEVELS[-1], r.stderr


@pytest.mark.parametrize("level", LEVELS)
def test_env_forces_a_level_and_info_says_so(level):
    require_backend("cpu", "cpu")
    env = dict(os.environ, MMKERNELS_CPU_ISA=level)
    r = subprocess.run([sys.executable, "-m", "mmkernels.info"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert f"CPU kernels' instruction set: {level} " in r.stdout


def test_env_refuses_an_unknown_level():
    require_backend("cpu", "cpu")
    env = dict(os.environ, MMKERNELS_CPU_ISA="sse9")
    code = "import torch, mmkernels; mmkernels.gated_fusion(torch.ones(2, 3, 4), torch.zeros(2, 3, 4))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "MMKERNELS_CPU_ISA=sse9: expected baseline, avx2 or avx512" in r.stderr


def test_setting_a_level_the_cpu_lacks_raises():
    require_backend("cpu", "cpu")
    with pytest.raises(ValueError, match="cpu_isa level must be one of"):
        backends.cpu_isa("neon")
    missing = [lvl for lvl in backends.CPU_ISA_LEVELS if lvl not in LEVELS]
    for lvl in missing:
        with pytest.raises(RuntimeError, match="lacks"):
            backends.cpu_isa(lvl)


@pytest.mark.parametrize("at_level", LEVELS, indirect=True)
def test_backward_probabilities_stay_in_range_for_a_low_lse(at_level):
    """The backward recomputes P = exp(s - lse): from an lse below this forward's (another backend's, a
    stale one) its argument is positive, where an exp without a bound wraps its exponent into the sign
    bit. P stays in [0, 1]: with grad_out all ones, each dV row (the sum of P over the queries) lies in
    [0, Lq]."""
    g = torch.Generator().manual_seed(3)
    B, L, H, D = 2, 8, 2, 16
    q, k, v = (torch.randn(B, L, H, D, generator=g) for _ in range(3))
    out, lse, _ = torch.ops.mmkernels.cross_modal_attention_fwd(q, [k], [v], None, None, None, None, 0.25, False,
                                                                None)
    for shift in (95.0, 120.0):
        _, _, dv, _, _ = torch.ops.mmkernels.cross_modal_attention_bwd(
            torch.ones_like(out), None, q, [k], [v], out, lse - shift, None, None, None, None, 0.25, False, None)
        assert bool((dv[0] >= 0).all()) and bool((dv[0] <= L).all()), (shift, dv[0].min(), dv[0].max())
