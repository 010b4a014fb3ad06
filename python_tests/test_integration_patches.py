"""mmkernels.integrations.patches: apply_idefics2_perceiver and apply_mllama_cross_attention on the
tiny random configs and padded batches of test_integration_families.py. Outputs at the valid
positions and every parameter's gradient equal the unpatched SDPA model's (2e-5), with the model on
attn_implementation="mmkernels" or left on SDPA; the op gets the arguments the patch promises
(two segments and the context's padding mask; the tile mask and the tanh gate as head_gate); stats()
counts the patched calls."""
import sys

import pytest
import torch

pytest.importorskip("transformers")

import mmkernels  # noqa: E402
import mmkernels.integrations.transformers as mmhf  # noqa: E402
from mmkernels.integrations import patches  # noqa: E402

import test_integration_families as fam  # noqa: E402


@pytest.fixture(autouse=True)
def _registered():
    mmhf.register()
    mmhf.reset_stats()
    patches.reset_stats()
    yield
    mmhf.register()


@pytest.fixture
def op_calls(monkeypatch):
    """The arguments of every cross_modal_attention call the patches make."""
    calls = []
    op = mmkernels.cross_modal_attention

    def spy(q, keys, values, **kw):
        if sys._getframe(1).f_globals["__name__"] == patches.__name__:
            calls.append(dict(q=q, keys=keys, values=values, **kw))
        return op(q, keys, values, **kw)

    monkeypatch.setattr(patches.mmkernels, "cross_modal_attention", spy)
    return calls


def _models(build, switched):
    ref, ours = build()
    if not switched:
        ours.set_attn_implementation("sdpa")
    return ref, ours


def _patched(apply, model):
    """apply(model) returns the model, and a second apply changes nothing."""
    assert apply(model) is model
    forwards = [m.__dict__["forward"] for m in model.modules() if "forward" in m.__dict__]
    assert forwards and apply(model) is model
    assert [m.__dict__["forward"] for m in model.modules() if "forward" in m.__dict__] == forwards
    return model


def _expect(patch, calls):
    """stats() of the patches: `calls` on the op, or, where only the reference serves key masks (the
    interface keeps SDPA then, and so do the patches), `calls` fallbacks for that."""
    if not fam._served_with_masks():
        assert list(patches.stats().values()) == [calls] and next(iter(patches.stats())).startswith("fallback: ")
    else:
        assert patches.stats() == {patch: calls}


@pytest.mark.parametrize("switched", [True, False])
def test_idefics2_perceiver(switched, op_calls):
    ref, ours = _models(fam._idefics2, switched)
    _patched(patches.apply_idefics2_perceiver, ours)
    batch = fam._idefics2_batch()
    a, b = (m(**batch) for m in (ref, ours))
    fam._close(b.logits, a.logits, batch["attention_mask"].bool())
    fam._close(b.image_outputs.pooler_output, a.image_outputs.pooler_output)
    _expect(patches.IDEFICS2, 1)
    if fam._served_with_masks():
        (call,) = op_calls  # latents over two segments: the 16 patches (padded: kv_masks[0]) and the 4 latents
        assert [k.shape[1] for k in call["keys"]] == [16, 4] and [v.shape[1] for v in call["values"]] == [16, 4]
        assert call["kv_masks"][1] is None and torch.equal(call["kv_masks"][0], fam._valid_patches())
    assert mmhf.stats() == ({fam.FUSED: 2} if switched else {})  # vision and text on the interface
    valid = batch["attention_mask"].bool()
    fam._grads(ref, ours, lambda m: (m(**batch).logits[valid] ** 2).mean(), params=48)
    _expect(patches.IDEFICS2, 2)


def test_idefics2_perceiver_without_padding(op_calls):
    """No padded patch: SDPA's mask is skipped (None), the op gets no key masks."""
    ref, ours = fam._idefics2()
    patches.apply_idefics2_perceiver(ours)
    batch = fam._idefics2_batch()
    batch["pixel_attention_mask"] = torch.ones_like(batch["pixel_attention_mask"])
    torch.manual_seed(3)
    batch["pixel_values"] = torch.randn_like(batch["pixel_values"])
    a, b = (m(**batch) for m in (ref, ours))
    fam._close(b.logits, a.logits, batch["attention_mask"].bool())
    assert patches.stats() == {patches.IDEFICS2: 1} and op_calls[0]["kv_masks"] is None


@pytest.mark.parametrize("switched", [True, False])
@pytest.mark.parametrize("image_first", [True, False])
def test_mllama_cross_attention(image_first, switched, op_calls):
    """The cross-attention layer on the op (the interface: only the 2 text self-attention layers; the
    2 vision layers' float masks stay on SDPA). With text before the image, that row sees every tile
    (padding tile included): a second op call over the rows up to it, without masks."""
    ref, ours = _models(fam._mllama, switched)
    _patched(patches.apply_mllama_cross_attention, ours)
    batch = fam._mllama_batch(image_first)
    valid = batch["attention_mask"].bool()
    a, b = (m(**batch).logits for m in (ref, ours))
    fam._close(b, a, valid)
    _expect(patches.MLLAMA, 1)
    assert mmhf.stats() == ({fam.FUSED: 2, fam.FLOAT_MASK: 2} if switched else {})
    if fam._served_with_masks():
        assert len(op_calls) == (1 if image_first else 2)
        main = op_calls[0]
        (key_mask,) = main["kv_masks"]
        n = key_mask.shape[1] // 2  # 2 tiles: sample 0 sees both, sample 1 only the first
        assert key_mask[0].all() and key_mask[1, :n].all() and not key_mask[1, n:].any()
        gate = ours.model.language_model.layers[1].cross_attn_attn_gate
        for call in op_calls:  # the tanh gate fused into head_gate (o_proj has no bias)
            assert call["head_gate"].shape == (2,) and torch.equal(call["head_gate"], gate.expand(2))
        if not image_first:
            assert op_calls[1]["q"].shape[1] == 1 and "kv_masks" not in op_calls[1]
    fam._grads(ref, ours, lambda m: (m(**batch).logits[valid] ** 2).mean(), params=75)
    _expect(patches.MLLAMA, 2)


def test_mllama_rows_before_the_image_are_not_zeroed():
    """Why the rows before the image get every key, not the sample's tile mask: the layer zeroes
    only their MLP branch (full_text_row_masked_out_mask), not their attention output, so the
    padding tile's states reach the first text row of the SDPA model (and, through the causal
    self-attention, the rows after it). The patched model follows; the tile mask alone would not."""
    ref, ours = fam._mllama()
    patches.apply_mllama_cross_attention(ours)
    batch = fam._mllama_batch(image_first=False)
    layer_out, shift = [], [0.0]

    def move_padding_tile(module, args, out):  # (B, images, tiles, patches, hidden): sample 1's tile 2
        out = out.clone()
        out[1, 0, 1] += shift[0]
        return out

    for model in (ref, ours):
        model.model.multi_modal_projector.register_forward_hook(move_padding_tile)
    ref.model.language_model.layers[1].register_forward_hook(lambda m, args, out: layer_out.append(out))
    with torch.no_grad():
        for shift[0] in (0.0, 1.0):
            fam._close(ours(**batch).logits, ref(**batch).logits, batch["attention_mask"].bool())
    x, y = layer_out  # the cross-attention layer's output: only sample 1's first row moved
    assert (x[1, 0] - y[1, 0]).abs().max() > 1e-3
    fam._close(x[:, 1:], y[:, 1:])
    fam._close(x[0], y[0])
    _expect(patches.MLLAMA, 2)


def test_mllama_rows_that_see_different_tiles_fall_back():
    """Two images, a text row that sees only the first and rows that see both: no key mask per sample,
    so the layer runs its own forward (counted), with the same results."""
    ref, ours = fam._mllama()
    patches.apply_mllama_cross_attention(ours)
    batch = fam._mllama_batch()
    torch.manual_seed(4)
    cam = torch.zeros(2, 7, 2, 2, dtype=torch.long, device=fam.DEVICE)
    cam[:, :, 0, :] = 1
    cam[:, 3:, 1, :1] = 1
    batch.update(cross_attention_mask=cam, pixel_values=torch.randn(2, 2, 2, 3, 16, 16, device=fam.DEVICE),
                 aspect_ratio_ids=torch.tensor([[2, 1], [2, 1]], device=fam.DEVICE),
                 aspect_ratio_mask=torch.tensor([[[1, 1], [1, 0]]] * 2, device=fam.DEVICE))
    a, b = (m(**batch).logits for m in (ref, ours))
    fam._close(b, a, batch["attention_mask"].bool())
    assert patches.stats() == {f"fallback: {patches.MLLAMA}: rows of a sample see different tiles": 1}


def test_wrong_model_raises_type_error():
    _, idefics2 = fam._idefics2()
    with pytest.raises(TypeError, match="MllamaCrossAttentionDecoderLayer"):
        patches.apply_mllama_cross_attention(idefics2)
    with pytest.raises(TypeError, match="Idefics2PerceiverAttention"):
        patches.apply_idefics2_perceiver(torch.nn.Linear(2, 2))
