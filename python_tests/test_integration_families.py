"""attn_implementation="mmkernels" across model families: a tiny random config per family (no
weights), one batch padded as the family is used (text right- or left-padded, padded image
patches), outputs (and for some families every parameter's gradient) equal to the SDPA model's
at the valid positions, and stats(): the calls that ran fused and the reason of every fallback.

The counts are what these configs give on CPU (where key masks run fused); a change that sends
a call to the fallback fails here. Every fallback left is explained where it is asserted.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkernels.integrations.transformers as mmhf  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = "mmkernels"
FLOAT_MASK = "fallback: torch.float32 mask (only boolean masks are mapped)"
ATOL = RTOL = 2e-5


@pytest.fixture(autouse=True)
def _registered():
    mmhf.register()
    mmhf.reset_stats()
    yield
    mmhf.register()


def _model_class(module, name):
    """transformers' class `name` from transformers.models.<module>, or skip the test."""
    mod = pytest.importorskip(f"transformers.models.{module}")
    cls = getattr(mod, name, None)
    if cls is None:
        pytest.skip(f"transformers.models.{module} has no {name}")
    return cls


def _pair(model_cls, config):
    """(sdpa model, mmkernels model) with the same weights and separate configs. The weights are
    redrawn at unit scale (matrices N(0, 1/fan_in), vectors - norms, biases, Mllama's tanh gates -
    their init + N(0, 0.5)): with the families' small inits and zero gates, parts of the models
    would barely reach the outputs, and their attention gradients would vanish under any tolerance."""
    torch.manual_seed(0)
    ref = model_cls(copy.deepcopy(config)).to(DEVICE).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
            else:
                p.add_(torch.randn_like(p), alpha=0.5)
    ref.set_attn_implementation("sdpa")
    ours = model_cls(copy.deepcopy(config)).to(DEVICE).eval()
    ours.load_state_dict(ref.state_dict())
    mmhf.use_mmkernels(ours)
    return ref, ours


def _padding(lengths, L, side="right"):
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()
    return (mask if side == "right" else mask.flip(1)).to(DEVICE)


def _served_with_masks():
    return not mmhf._serves_key_masks(torch.zeros(1, 1, 1, 16, device=DEVICE), 16)


def _assert_stats(fused, fallbacks=None, key_mask_calls=0):
    """stats() is exactly `fused` fused calls and `fallbacks` ({reason: calls}). Where the backend
    serves no key masks, up to `key_mask_calls` of the fused ones may instead fall back for that."""
    fallbacks = dict(fallbacks or {})
    stats = mmhf.stats()
    if _served_with_masks() or not key_mask_calls:
        assert stats == ({FUSED: fused} if fused else {}) | fallbacks
        return
    reasons = {k for k in stats if k.startswith("fallback: ") and k not in fallbacks}
    assert len(reasons) <= 1 and sum(stats.values()) == fused + sum(fallbacks.values())
    assert stats.get(FUSED, 0) >= fused - key_mask_calls


def _close(got, want, valid=None, **tol):
    tol = {"atol": ATOL, "rtol": RTOL, **tol}
    if valid is not None:
        got, want = got[valid], want[valid]
    torch.testing.assert_close(got, want, **tol)


def _grads(ref, ours, loss_fn, params):
    """Every parameter's gradient of loss_fn(model) equal in both models (in eval mode: no dropout);
    `params` of them get one. (Key-projection biases get 0 up to rounding: softmax ignores a shift
    of a whole row of scores.)"""
    grads = []
    for model in (ref, ours):
        model.zero_grad()
        loss_fn(model).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == params
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=ATOL, rtol=RTOL, msg=name)


# --- Mllama: vision tower over tiles, text decoder with cross-attention layers ---------------------

def _mllama():
    cls = _model_class("mllama", "MllamaForConditionalGeneration")
    from transformers import MllamaConfig

    vision = dict(hidden_size=32, num_hidden_layers=1, num_global_layers=1, attention_heads=2, intermediate_size=64,
                  vision_output_dim=64, image_size=16, patch_size=8, max_num_tiles=2, intermediate_layers_indices=[0],
                  supported_aspect_ratios=[[1, 1], [1, 2]])
    text = dict(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, cross_attention_layers=[1], max_position_embeddings=64, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    return _pair(cls, MllamaConfig(vision_config=vision, text_config=text, image_token_index=100))


def _mllama_batch(image_first=True):
    """Two samples, one image each (of 2 tiles; the second sample's second tile is padding), text
    right-padded. The
    cross-attention mask is the processor's: each text token from the image token on sees that
    image's real tiles (padding tokens included); tokens before it see none."""
    torch.manual_seed(1)
    B, L = 2, 7
    ids = torch.randint(3, 100, (B, L))
    image_at = 0 if image_first else 1
    ids[:, image_at] = 100
    if not image_first:
        ids[:, 0] = 1  # <|begin_of_text|> before <|image|>
    mask = _padding([7, 5], L)
    cam = torch.zeros(B, L, 1, 2, dtype=torch.long)
    cam[0, image_at:, 0, :2] = 1
    cam[1, image_at:, 0, :1] = 1
    return dict(input_ids=ids.to(DEVICE), attention_mask=mask,
                pixel_values=torch.randn(B, 1, 2, 3, 16, 16, device=DEVICE),
                aspect_ratio_ids=torch.tensor([[2], [1]], device=DEVICE),
                aspect_ratio_mask=torch.tensor([[[1, 1]], [[1, 0]]], device=DEVICE),
                cross_attention_mask=cam.to(DEVICE))


NOT_A_KEY_MASK = "fallback: mask is neither a key mask nor a causal key mask"


@pytest.mark.parametrize("image_first", [True, False])
@pytest.mark.parametrize("float_masks", [False, True])
def test_mllama(image_first, float_masks):
    """5 calls: vision local + global layer, 2 text self-attention layers (fused: causal key mask
    over the right padding), 1 cross-attention layer. The other 3 get float masks (0 / finfo.min):
    - the vision layers' aspect-ratio mask is no key mask even as a boolean: it blocks (i, j) only
      when both patches are padding, so real patches attend padding patches and padding patches
      only real ones (there are always padding patches: each tile is padded to a multiple of 8);
    - the cross-attention mask, with the image first, is one key mask per sample (the image's
      real tiles): fused under float_masks. With text before the image, those text rows are all 0
      (they see every tile, padding tiles included; the layer zeroes their output afterwards), so
      it is no key mask."""
    mmhf.register(float_masks=float_masks)
    ref, ours = _mllama()
    batch = _mllama_batch(image_first)
    a, b = (m(**batch).logits for m in (ref, ours))
    _close(b, a, batch["attention_mask"].bool())
    if not float_masks:
        _assert_stats(2, {FLOAT_MASK: 3}, key_mask_calls=2)
    elif image_first:
        _assert_stats(3, {NOT_A_KEY_MASK: 2}, key_mask_calls=3)
    else:
        _assert_stats(2, {NOT_A_KEY_MASK: 3}, key_mask_calls=2)


def test_mllama_gradients():
    """With float_masks, so that the cross-attention layer runs fused (on a key mask) in both
    directions."""
    mmhf.register(float_masks=True)
    ref, ours = _mllama()
    batch = _mllama_batch()
    valid = batch["attention_mask"].bool()
    _grads(ref, ours, lambda m: (m(**batch).logits[valid] ** 2).mean(), params=75)
    _assert_stats(3, {NOT_A_KEY_MASK: 2}, key_mask_calls=3)


def _float_mask_call(mask, **tensor_kw):
    torch.manual_seed(2)
    query = torch.randn(2, 4, 5, 8, device=DEVICE, **tensor_kw)
    key, value = (torch.randn(2, 2, 6, 8, device=DEVICE, **tensor_kw) for _ in range(2))
    module = torch.nn.Module()
    module.is_causal = False
    module.num_key_value_groups = 2
    out, _ = mmhf.mmkernels_attention_forward(module, query, key, value, mask, scaling=0.4)
    ref = torch.nn.functional.scaled_dot_product_attention(query, key.repeat_interleave(2, 1),
                                                           value.repeat_interleave(2, 1), attn_mask=mask, scale=0.4)
    return out, ref.transpose(1, 2), (query, key, value)


@pytest.mark.parametrize("blocked", [float("-inf"), torch.finfo(torch.float32).min])
@pytest.mark.parametrize("pattern", ["right", "holes", "causal"])
def test_float_masks_that_only_block_keys_map_exactly(blocked, pattern):
    """register(float_masks=True): a float mask of 0 and -inf / finfo.min is read as the boolean mask
    it amounts to and goes through the same mapping (right padding -> kv_lengths, any key mask and
    a causal key mask -> kv_masks); outputs and input gradients equal SDPA's on the float mask."""
    mmhf.register(float_masks=True)
    attend = torch.ones(2, 1, 5, 6, dtype=torch.bool, device=DEVICE)
    attend[1, ..., 4:] = False
    if pattern == "holes":
        attend[0, ..., 1:3] = False
    if pattern == "causal":
        attend &= torch.ones(5, 6, dtype=torch.bool, device=DEVICE).tril(1)
    mask = torch.zeros(attend.shape, device=DEVICE).masked_fill(~attend, blocked)
    out, ref, inputs = _float_mask_call(mask, requires_grad=True)
    _close(out, ref)
    grads = [torch.autograd.grad((o ** 2).sum(), inputs) for o in (out, ref)]
    for g, r in zip(*grads):
        _close(g, r)
    if pattern == "right" or _served_with_masks():
        assert mmhf.stats() == {FUSED: 1}


@pytest.mark.parametrize("case,why", [
    ("bias", "torch.float32 mask with values other than 0, -inf and the dtype's min"),
    ("fully masked row", "torch.float32 mask with a fully masked query row"),
    ("requires grad", "torch.float32 mask that requires grad"),
    ("not enabled", "torch.float32 mask (only boolean masks are mapped)"),
])
def test_float_masks_that_do_more_go_to_the_fallback(case, why):
    """A float mask that carries a bias, blocks every key of a query row (SDPA: NaN or the mean of
    all values; the kernel: 0) or takes a gradient stays on SDPA, and so does every float mask
    without float_masks."""
    mmhf.register(float_masks=case != "not enabled")
    mask = torch.zeros(2, 1, 5, 6, device=DEVICE)
    mask[1, ..., 4:] = float("-inf")
    if case == "bias":
        mask[0, ..., 0] = -1.5
    if case == "fully masked row":
        mask[0, :, 2, :] = torch.finfo(torch.float32).min
    if case == "requires grad":
        mask.requires_grad_()
    out, ref, _ = _float_mask_call(mask)
    _close(out, ref)
    assert mmhf.stats() == {"fallback: " + why: 1}


# --- BLIP-2: vision encoder, Q-Former (self- and cross-attention), OPT decoder --------------------

def _blip2():
    cls = _model_class("blip_2", "Blip2ForConditionalGeneration")
    from transformers import Blip2Config

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    qformer = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   cross_attention_frequency=1, encoder_hidden_size=32)
    text = dict(model_type="opt", vocab_size=101, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=1, bos_token_id=2,
                eos_token_id=2)
    return _pair(cls, Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4,
                                  image_token_index=100))


def _blip2_batch(side):
    torch.manual_seed(1)
    mask = _padding([10, 7], 10, side)
    ids = torch.randint(3, 100, (2, 10), device=DEVICE)
    for b in range(2):  # the 4 query-token slots right after the padding (left) or at the start (right)
        start = int((mask[b] == 0).sum()) if side == "left" else 0
        ids[b, start:start + 4] = 100
    ids[mask == 0] = 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 16, 16, device=DEVICE))


@pytest.mark.parametrize("side", ["right", "left"])
def test_blip2(side):
    """6 calls, all fused: vision self-attention (no mask), 2 Q-Former layers of query
    self-attention and cross-attention over the image (no mask), the OPT layer (causal key mask)."""
    ref, ours = _blip2()
    batch = _blip2_batch(side)
    a, b = (m(**batch) for m in (ref, ours))
    _close(b.logits, a.logits, batch["attention_mask"].bool())
    _close(b.qformer_outputs.last_hidden_state, a.qformer_outputs.last_hidden_state)
    _assert_stats(6, key_mask_calls=1)


def test_blip2_gradients():
    ref, ours = _blip2()
    batch = _blip2_batch("right")
    valid = batch["attention_mask"].bool()
    _grads(ref, ours, lambda m: (m(**batch).logits[valid] ** 2).mean(), params=95)
    _assert_stats(6, key_mask_calls=1)


# --- Idefics2: SigLIP-style vision over padded patches, perceiver resampler, Mistral text ----------

def _idefics2():
    cls = _model_class("idefics2", "Idefics2ForConditionalGeneration")
    from transformers import Idefics2Config

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4)
    perceiver = dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                     resampler_head_dim=16, num_key_value_heads=1)
    text = dict(model_type="mistral", vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                sliding_window=None)
    return _pair(cls, Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text,
                                     image_token_id=100))


def _idefics2_batch():
    """Text left-padded; the second image fills 12 x 8 of the 16 x 16 pixels (the patch mask has
    holes: 3 of 4 patch columns in the top 2 of 4 rows)."""
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, 10))
    mask = _padding([10, 7], 10, "left")
    ids[0, 2:6] = 100
    ids[1, :3] = 0
    ids[1, 3:7] = 100
    pixels = torch.randn(2, 1, 3, 16, 16)
    pixel_mask = torch.ones(2, 1, 16, 16, dtype=torch.long)
    pixel_mask[1, 0, :, 12:] = 0
    pixel_mask[1, 0, 8:, :] = 0
    pixels[pixel_mask[:, :, None].expand_as(pixels) == 0] = 0
    return dict(input_ids=ids.to(DEVICE), attention_mask=mask, pixel_values=pixels.to(DEVICE),
                pixel_attention_mask=pixel_mask.to(DEVICE))


def _valid_patches():
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[1, :, 3:] = False
    valid[1, 2:, :] = False
    return valid.reshape(2, 16).to(DEVICE)


def test_idefics2():
    """3 calls, all fused on key masks: vision self-attention over the padded patches, perceiver
    cross-attention (latents over the patches + latents: a key mask with the padding in the middle),
    the text layer (causal key mask over the left padding)."""
    ref, ours = _idefics2()
    batch = _idefics2_batch()
    a, b = (m(**batch) for m in (ref, ours))
    _close(b.logits, a.logits, batch["attention_mask"].bool())
    _close(b.image_outputs.last_hidden_state, a.image_outputs.last_hidden_state, _valid_patches())
    _close(b.image_outputs.pooler_output, a.image_outputs.pooler_output)
    _assert_stats(3, key_mask_calls=3)


def test_idefics2_gradients():
    ref, ours = _idefics2()
    batch = _idefics2_batch()
    valid = batch["attention_mask"].bool()
    _grads(ref, ours, lambda m: (m(**batch).logits[valid] ** 2).mean(), params=48)
    _assert_stats(3, key_mask_calls=3)


# --- Whisper: encoder, decoder with self- and cross-attention -------------------------------------

def _whisper():
    cls = _model_class("whisper", "WhisperModel")
    from transformers import WhisperConfig

    return _pair(cls, WhisperConfig(
        vocab_size=101, num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, decoder_layers=1,
        decoder_attention_heads=2, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=8,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))


def _whisper_batch():
    torch.manual_seed(1)
    return dict(input_features=torch.randn(2, 8, 16, device=DEVICE),
                decoder_input_ids=torch.randint(3, 100, (2, 7), device=DEVICE),
                decoder_attention_mask=_padding([7, 4], 7))


def test_whisper():
    """3 calls, all fused: encoder self-attention (no mask: audio frames are never padded), decoder
    self-attention (causal key mask over the right padding), cross-attention (no mask)."""
    ref, ours = _whisper()
    batch = _whisper_batch()
    a, b = (m(**batch) for m in (ref, ours))
    _close(b.last_hidden_state, a.last_hidden_state, batch["decoder_attention_mask"].bool())
    _close(b.encoder_last_hidden_state, a.encoder_last_hidden_state)
    _assert_stats(3, key_mask_calls=1)


def test_whisper_gradients():
    ref, ours = _whisper()
    batch = _whisper_batch()
    valid = batch["decoder_attention_mask"].bool()
    _grads(ref, ours, lambda m: (m(**batch).last_hidden_state[valid] ** 2).mean(), params=49)
    _assert_stats(3, key_mask_calls=1)


# --- BART: encoder, decoder with self- and cross-attention -----------------------------------------

def _bart():
    cls = _model_class("bart", "BartModel")
    from transformers import BartConfig

    return _pair(cls, BartConfig(
        vocab_size=101, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, dropout=0.0, attention_dropout=0.0))


def _bart_batch(side):
    torch.manual_seed(1)
    return dict(input_ids=torch.randint(3, 100, (3, 9), device=DEVICE), attention_mask=_padding([9, 5, 2], 9, side),
                decoder_input_ids=torch.randint(3, 100, (3, 6), device=DEVICE),
                decoder_attention_mask=_padding([6, 3, 6], 6, side))


@pytest.mark.parametrize("side", ["right", "left"])
def test_bart(side):
    """3 calls, all fused: encoder self-attention and cross-attention over the encoder padding
    (right: kv_lengths; left: key masks), decoder self-attention (causal key mask)."""
    ref, ours = _bart()
    batch = _bart_batch(side)
    a, b = (m(**batch) for m in (ref, ours))
    _close(b.last_hidden_state, a.last_hidden_state, batch["decoder_attention_mask"].bool())
    _close(b.encoder_last_hidden_state, a.encoder_last_hidden_state, batch["attention_mask"].bool())
    _assert_stats(3, key_mask_calls=3 if side == "left" else 1)


def test_bart_gradients():
    ref, ours = _bart()
    batch = _bart_batch("right")
    valid = batch["decoder_attention_mask"].bool()
    _grads(ref, ours, lambda m: (m(**batch).last_hidden_state[valid] ** 2).mean(), params=49)
    _assert_stats(3, key_mask_calls=1)


# --- Qwen2-VL: vision tower (one call per image), text with M-RoPE -------------------------------

def test_qwen2_vl():
    """4 calls, all fused: the vision tower's non-flash path splits the packed patches of the 2
    images (16 and 8 patches) into one unmasked call each; 2 text layers (causal key mask over the
    left padding)."""
    cls = _model_class("qwen2_vl", "Qwen2VLForConditionalGeneration")
    from transformers import Qwen2VLConfig

    vision = dict(depth=1, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=2, in_channels=3, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    text = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    ref, ours = _pair(cls, Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=100,
                                         video_token_id=99, vision_start_token_id=97, vision_end_token_id=98))
    torch.manual_seed(1)
    grid = torch.tensor([[1, 4, 4], [1, 2, 4]])  # (t, h, w) patches: 4 and 2 tokens after the 2x2 merge
    ids = torch.randint(3, 90, (2, 10))
    mask = _padding([10, 8], 10, "left")
    ids[0, 1], ids[0, 2:6], ids[0, 6] = 97, 100, 98
    ids[1, :2] = 0
    ids[1, 3], ids[1, 4:6], ids[1, 6] = 97, 100, 98
    batch = dict(input_ids=ids.to(DEVICE), attention_mask=mask, mm_token_type_ids=(ids == 100).long().to(DEVICE),
                 pixel_values=torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4, device=DEVICE),
                 image_grid_thw=grid.to(DEVICE))
    a, b = (m(**batch).logits for m in (ref, ours))
    _close(b, a, mask.bool())
    _assert_stats(4, key_mask_calls=2)


# --- LLaVA: CLIP vision tower, Llama text ----------------------------------------------------------

def _llava():
    cls = _model_class("llava", "LlavaForConditionalGeneration")
    from transformers import LlavaConfig

    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=16, patch_size=4, projection_dim=32)
    text = dict(model_type="llama", vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    return _pair(cls, LlavaConfig(vision_config=vision, text_config=text, image_token_index=100,
                                  vision_feature_layer=-1, vision_feature_select_strategy="default"))


def _llava_batch():
    """Text left-padded (as for batched generation), 16 image tokens per sample."""
    torch.manual_seed(1)
    ids = torch.randint(3, 90, (2, 22))
    ids[:, 2:18] = 100
    ids[1, :2] = 0
    return dict(input_ids=ids.to(DEVICE), attention_mask=_padding([22, 20], 22, "left"),
                pixel_values=torch.randn(2, 3, 16, 16, device=DEVICE))


def test_llava():
    """4 calls, all fused: 2 CLIP vision layers (no mask), 2 Llama layers (causal key mask over the
    left padding, GQA)."""
    ref, ours = _llava()
    batch = _llava_batch()
    a, b = (m(**batch).logits for m in (ref, ours))
    _close(b, a, batch["attention_mask"].bool())
    _assert_stats(4, key_mask_calls=2)


def test_llava_gradients():
    ref, ours = _llava()
    batch = _llava_batch()
    valid = batch["attention_mask"].bool()
    _grads(ref, ours, lambda m: (m(**batch).logits[valid] ** 2).mean(), params=62)
    _assert_stats(4, key_mask_calls=2)


# --- CLIP and SigLIP: dual encoders -----------------------------------------------------------------

@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_dual_encoders(family):
    """2 calls, both fused: the vision layer (no mask) and the text layer over right-padded text
    (CLIP: causal key mask; SigLIP: bidirectional, kv_lengths)."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4)
    text = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "clip":
        cls = _model_class("clip", "CLIPModel")
        from transformers import CLIPConfig as Config

        extra = {"projection_dim": 32}
    else:
        cls = _model_class("siglip", "SiglipModel")
        from transformers import SiglipConfig as Config

        extra = {}
    ref, ours = _pair(cls, Config(vision_config=vision, text_config=text, **extra))
    torch.manual_seed(1)
    ids = torch.randint(3, 90, (3, 9))
    ids[0, 8], ids[1, 5], ids[2, 2] = 2, 2, 2  # eos: CLIP pools there
    mask = _padding([9, 6, 3], 9)
    batch = dict(input_ids=ids.to(DEVICE), attention_mask=mask, pixel_values=torch.randn(3, 3, 16, 16, device=DEVICE))
    a, b = (m(**batch) for m in (ref, ours))
    _close(b.text_model_output.last_hidden_state, a.text_model_output.last_hidden_state, mask.bool())
    _close(b.vision_model_output.last_hidden_state, a.vision_model_output.last_hidden_state)
    _close(b.logits_per_image, a.logits_per_image)
    _assert_stats(2, key_mask_calls=1 if family == "clip" else 0)
