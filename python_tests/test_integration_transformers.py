"""attn_implementation="mmkernels" in transformers models: same outputs and gradients as
transformers' SDPA path, the fused op used where the mask allows, the fallback (and its
reason) everywhere else."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkernels.integrations.transformers as mmhf  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _registered():
    mmhf.register()
    mmhf.reset_stats()
    yield
    mmhf.register()  # back to the defaults for other tests


def _pair(model_cls, config):
    """(sdpa model, mmkernels model) with the same weights and separate configs."""
    torch.manual_seed(0)
    ref = model_cls(copy.deepcopy(config)).to(DEVICE).eval()
    ref.set_attn_implementation("sdpa")
    ours = model_cls(copy.deepcopy(config)).to(DEVICE).eval()
    ours.load_state_dict(ref.state_dict())
    mmhf.use_mmkernels(ours)
    assert ours.config._attn_implementation == "mmkernels" and ref.config._attn_implementation == "sdpa"
    return ref, ours


def _bert(layers=2):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=96, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    return _pair(lambda c: BertModel(c, add_pooling_layer=False), cfg)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return _pair(LlamaForCausalLM, cfg)


def _right_padded_mask(lengths, L):
    return (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long().to(DEVICE)


def test_encoder_with_right_padding_runs_fused_and_matches_sdpa():
    ref, ours = _bert()
    ids = torch.randint(0, 97, (3, 13), device=DEVICE)
    mask = _right_padded_mask([13, 8, 2], 13)
    a = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    b = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(b[valid], a[valid], atol=2e-5, rtol=2e-5)
    assert mmhf.stats() == {"mmkernels": 2}  # one call per layer, none fell back


def test_encoder_gradients_match_sdpa():
    ref, ours = _bert()
    ref.train()
    ours.train()
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    mask = _right_padded_mask([9, 5], 9)
    grads = []
    for model in (ref, ours):
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        (out[mask.bool()] ** 2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4, msg=name)
    assert mmhf.stats() == {"mmkernels": 2}


def _served_with_masks():
    """Whether key masks run fused on this device (else the integration falls back to SDPA)."""
    return not mmhf._serves_key_masks(torch.zeros(1, 1, 1, 16, device=DEVICE), 16)


@pytest.mark.parametrize("pattern", ["left", "holes"])
def test_encoder_with_left_padding_or_holes_uses_key_masks(pattern):
    ref, ours = _bert()
    ids = torch.randint(0, 97, (3, 11), device=DEVICE)
    mask = _right_padded_mask([11, 6, 3], 11).flip(1)
    if pattern == "holes":
        mask[0, 2:5] = 0
        mask[2] = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 1])
    a = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    b = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(b[valid], a[valid], atol=2e-5, rtol=2e-5)
    if _served_with_masks():
        assert mmhf.stats() == {"mmkernels": 2}
    else:
        assert list(mmhf.stats()) == [k for k in mmhf.stats() if k.startswith("fallback: ")]


def test_left_padded_causal_decoder_prefill_grads_and_generation():
    """Batched generation pads on the left: prefill and every decoding step with a cache."""
    ref, ours = _llama()
    ids = torch.randint(1, 101, (3, 8), device=DEVICE)
    mask = _right_padded_mask([8, 5, 2], 8).flip(1)
    a, b = (m(input_ids=ids, attention_mask=mask).logits for m in (ref, ours))
    valid = mask.bool()
    torch.testing.assert_close(b[valid], a[valid], atol=2e-5, rtol=2e-5)
    if _served_with_masks():
        assert mmhf.stats() == {"mmkernels": 2}
    grads = []
    for model in (ref, ours):
        model.zero_grad()
        (model(input_ids=ids, attention_mask=mask).logits[valid] ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4, msg=name)
    mmhf.reset_stats()
    kw = dict(max_new_tokens=4, do_sample=False, attention_mask=mask, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))
    if _served_with_masks():
        assert mmhf.stats() == {"mmkernels": 2 * 4}  # prefill + 3 decoding steps, 2 layers each


def test_masks_built_by_the_mask_function_need_no_pattern_check(monkeypatch):
    """The decoder's padded causal masks come from mmkernels_mask: the attention function takes the
    padding mask it recorded, without comparing the 4-D mask (no device sync on a GPU)."""
    ref, ours = _llama()
    ids = torch.randint(1, 101, (3, 8), device=DEVICE)
    mask = _right_padded_mask([8, 5, 2], 8).flip(1)
    want = ref(input_ids=ids, attention_mask=mask).logits

    def no_check(*args, **kwargs):
        raise AssertionError("the mask was pattern-checked")

    monkeypatch.setattr(mmhf, "_lengths_from_mask", no_check)
    monkeypatch.setattr(mmhf, "_key_mask_from_mask", no_check)
    got = ours(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=2e-5)
    if _served_with_masks():
        assert mmhf.stats() == {"mmkernels": 2}
    kw = dict(max_new_tokens=3, do_sample=False, attention_mask=mask, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_a_static_cache_mask_is_checked_not_assumed():
    """With a static cache the keys run past the last query: the mask is not bottom-right aligned,
    so mmkernels_mask does not describe it and the attention function checks it (or falls back)."""
    from transformers.masking_utils import causal_mask_function

    pad = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool, device=DEVICE)
    m = mmhf.mmkernels_mask(1, 3, 8, q_offset=2, kv_offset=0, mask_function=causal_mask_function,
                            attention_mask=pad, device=DEVICE)
    assert m is not None and mmhf._known_mask(m, 1, 8) is None
    aligned = mmhf.mmkernels_mask(1, 3, 8, q_offset=5, kv_offset=0, mask_function=causal_mask_function,
                                  attention_mask=pad, device=DEVICE)
    known = mmhf._known_mask(aligned, 1, 8)
    assert known is not None and known[1] is True and torch.equal(known[0], pad)


def test_a_mask_that_is_no_key_mask_falls_back():
    """A mask whose query rows differ otherwise than by the causal triangle (packed sequences)."""
    query, key, value = (torch.randn(2, 2, 6, 8, device=DEVICE) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool, device=DEVICE)
    mask[:, :, :3, 3:] = False
    mask[:, :, 3:, :3] = False  # two documents packed in one row
    module = torch.nn.Module()
    module.is_causal = False
    out, _ = mmhf.mmkernels_attention_forward(module, query, key, value, mask, scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    assert mmhf.stats() == {"fallback: mask is neither a key mask nor a causal key mask": 1}


@pytest.mark.parametrize("model,served", [
    ("bert", {"mmkernels": 2}),
    # the decoder's masks come from mmkernels_mask, which says what they are: no check to skip
    ("llama", {"mmkernels": 2}),
])
def test_unchecked_masks(model, served):
    """check_masks=False maps right-padding masks without verifying them; masks that mmkernels_mask
    built need no verification (a causal decoder's padded mask would otherwise read as a prefix)."""
    mmhf.register(check_masks=False)
    ref, ours = _bert() if model == "bert" else _llama()
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    mask = _right_padded_mask([9, 4], 9)
    a, b = (m(input_ids=ids, attention_mask=mask)[0] for m in (ref, ours))
    torch.testing.assert_close(b[mask.bool()], a[mask.bool()], atol=2e-5, rtol=2e-5)
    assert mmhf.stats() == served


def test_dropout_while_training_falls_back():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, attention_probs_dropout_prob=0.1)
    model = mmhf.use_mmkernels(BertModel(cfg).to(DEVICE).train())
    model(input_ids=torch.randint(0, 97, (2, 5), device=DEVICE))
    assert mmhf.stats() == {"fallback: attention dropout while training": 1}
    mmhf.reset_stats()
    model.eval()
    model(input_ids=torch.randint(0, 97, (2, 5), device=DEVICE))
    assert mmhf.stats() == {"mmkernels": 1}


def test_causal_decoder_with_gqa_prefill_and_greedy_generation():
    ref, ours = _llama()
    ids = torch.randint(0, 101, (2, 9), device=DEVICE)
    torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=2e-5, rtol=2e-5)
    assert mmhf.stats() == {"mmkernels": 2}
    mmhf.reset_stats()
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=5, do_sample=False, attention_mask=mask, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))
    assert mmhf.stats().get("mmkernels", 0) == 2 * 5  # prefill + 4 decode steps, 2 layers each


def test_float_masks_go_to_the_fallback():
    """Additive float masks are not mapped (they may carry biases): the fallback serves them."""
    query = torch.randn(2, 4, 5, 8, device=DEVICE)
    key = torch.randn(2, 4, 6, 8, device=DEVICE)
    value = torch.randn(2, 4, 6, 8, device=DEVICE)
    mask = torch.zeros(2, 1, 5, 6, device=DEVICE)
    mask[1, ..., 4:] = float("-inf")
    module = torch.nn.Module()
    module.is_causal = False
    out, _ = mmhf.mmkernels_attention_forward(module, query, key, value, mask, scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    assert mmhf.stats() == {"fallback: torch.float32 mask (only boolean masks are mapped)": 1}
