"""Fusion model: shapes, mmkernels ops vs reference ops with the same weights, zero-init gates,
modality removal, heads, save_pretrained / from_pretrained, metrics."""
import os

import pytest
import torch

pytest.importorskip("transformers")
try:
    from mmkernels.models.text import load_tokenizer
    load_tokenizer()
except Exception as e:  # pragma: no cover
    pytest.skip(f"MiniLM tokenizer unavailable: {e}", allow_module_level=True)

from mmkernels.models import FusionModel, ModelConfig  # noqa: E402
from mmkernels.nn import CrossModalBlock, GatedMultimodalUnit, LogMelFrontEnd  # noqa: E402
from mmkernels.train import metrics  # noqa: E402

TINY = dict(d_model=32, num_heads=2, text_hidden=32, text_layers=1, text_heads=2, image_channels=8,
            audio_layers=1, gmu_hidden=32, dropout=0.0)


def make_batch(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = load_tokenizer()
    enc = tok(["Which digit is spoken?", "What is the sum of the spoken and the written digits?", "Is it?"][:B] * 3,
              padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    L = torch.tensor([8000, 3000, 1200][:B])
    audio = (torch.rand(B, 8000, generator=g) * 2 - 1) * (torch.arange(8000)[None] < L[:, None])
    return {"input_ids": enc["input_ids"][:B], "attention_mask": enc["attention_mask"][:B],
            "image": torch.randint(0, 256, (B, 28, 28), generator=g, dtype=torch.uint8),
            "audio": audio, "audio_lengths": L, "labels": torch.tensor([1, 5, 20][:B])}


def randomize_gates(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("head_gate", "ff_gate", "modality_bias")):
                p.uniform_(-1, 1)


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    m = FusionModel(ModelConfig(**TINY))
    out = m(make_batch())
    assert out["logits"].shape == (3, 21) and out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert m.image.cnn[0].weight.grad is not None and m.audio.conv[0].weight.grad is not None


def test_ops_vs_reference_same_weights():
    torch.manual_seed(0)
    m = FusionModel(ModelConfig(**TINY)).double()
    randomize_gates(m)
    b = make_batch()
    b["audio"] = b["audio"].double()
    outs, grads = [], []
    for backend in (None, "reference"):
        m.set_backend(backend)
        m.zero_grad()
        o = m(b)
        o["loss"].backward()
        outs.append(o["logits"].detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9)


def test_cross_modal_block_starts_as_identity():
    torch.manual_seed(0)
    blk = CrossModalBlock(16, 2, 2)
    x = torch.randn(2, 5, 16)
    src = [torch.randn(2, 7, 16), torch.randn(2, 3, 16)]
    y = blk(x, src, torch.tensor([[7, 3], [2, 0]], dtype=torch.int32), torch.tensor([5, 3], dtype=torch.int32))
    torch.testing.assert_close(y, x)
    y.sum().backward()
    assert blk.attn.head_gate.grad.abs().sum() > 0  # the gate learns first (Flamingo)


def test_modality_removal_changes_prediction_and_is_finite():
    torch.manual_seed(0)
    m = FusionModel(ModelConfig(**TINY)).eval()
    randomize_gates(m)
    b = make_batch()
    full = m(b)["logits"]
    for drop in ("image", "audio", "text"):
        o = m(b, drop=(drop,))["logits"]
        assert torch.isfinite(o).all()
        assert not torch.allclose(o, full)
    # removing a modality = the same model never seeing it: its input does not matter any more
    b2 = dict(b, image=torch.zeros_like(b["image"]))
    torch.testing.assert_close(m(b, drop=("image",))["logits"], m(b2, drop=("image",))["logits"])


def test_gmu_is_arevalo_for_two_modalities():
    torch.manual_seed(0)
    g = GatedMultimodalUnit([4, 4], 3)
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    h, gates = g([x, y], return_gates=True)
    torch.testing.assert_close(gates.sum(0), torch.ones(5, 3))
    hx, hy = torch.tanh(g.proj[0](x)), torch.tanh(g.proj[1](y))
    torch.testing.assert_close(h, gates[0] * hx + gates[1] * hy)
    present = torch.tensor([[True] * 5, [False] * 5])
    torch.testing.assert_close(g([x, y], present=present), hx)


def test_logmel_frontend():
    fe = LogMelFrontEnd()
    wav = torch.sin(torch.arange(8000) / 3.0)[None].repeat(2, 1)
    mel, fl = fe(wav, torch.tensor([8000, 4000]))
    assert mel.shape == (2, 101, 40) and fl.tolist() == [101, 51]
    assert mel[1, 51:].abs().sum() == 0


def test_token_classification_and_classification_heads():
    torch.manual_seed(0)
    m = FusionModel(ModelConfig(**TINY, task="token_classification", num_labels=5))
    b = make_batch()
    b["labels"] = torch.randint(0, 5, b["input_ids"].shape).masked_fill(b["attention_mask"] == 0, -100)
    out = m(b)
    assert out["logits"].shape == (3, 16, 5) and torch.isfinite(out["loss"])
    m2 = FusionModel(ModelConfig(**TINY, task="classification", num_labels=10, modalities=["image", "audio"]))
    b = make_batch()
    b["labels"] = torch.tensor([1, 2, 3])
    assert m2(b)["logits"].shape == (3, 10)


def test_save_and_load_pretrained(tmp_path):
    torch.manual_seed(0)
    m = FusionModel(ModelConfig(**TINY, labels=[str(i) for i in range(21)])).eval()
    randomize_gates(m)
    b = make_batch()
    m.save_pretrained(str(tmp_path / "m"))
    m2 = FusionModel.from_pretrained(str(tmp_path / "m")).eval()
    torch.testing.assert_close(m(b)["logits"], m2(b)["logits"])
    assert m2.config.labels == m.config.labels
    m3 = FusionModel.from_pretrained(str(tmp_path / "m"), kernel_backend="reference").eval()
    assert m3.gmu.backend == "reference" and m3.fusion[0]["text"].attn.backend == "reference"
    torch.testing.assert_close(m(b)["logits"], m3(b)["logits"], rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (tmp_path / "m" / "model.safetensors").unlink()
        FusionModel.from_pretrained(str(tmp_path / "m"))


def test_text_finetune_policies():
    m = FusionModel(ModelConfig(**dict(TINY, text_layers=3), text_finetune="top_k", text_top_k=1))
    req = [any(p.requires_grad for p in l.parameters()) for l in m.text.encoder.layer]
    assert req == [False, False, True]
    m = FusionModel(ModelConfig(**TINY, text_finetune="frozen"))
    assert not any(p.requires_grad for p in m.text.parameters())
    with pytest.raises(ValueError, match="text_finetune"):
        FusionModel(ModelConfig(**TINY, text_finetune="some"))


def test_metrics():
    assert metrics.accuracy([1, 2, 3], [1, 2, 0]) == pytest.approx(2 / 3)
    assert metrics.macro_f1([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-PER"], ["O", "B-ORG"]]
    r = metrics.entity_f1(pred, gold)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert metrics.entity_f1([["I-X", "I-X", "O"]], [["B-X", "I-X", "O"]])["f1"] == 1.0  # as conlleval


def test_frozen_text_encoder_runs_in_eval_mode_and_dedups_exactly():
    torch.manual_seed(0)
    m = FusionModel(ModelConfig(**dict(TINY, dropout=0.1), text_finetune="frozen")).train()
    assert not m.text.training and m.image.training
    b = make_batch()
    b["input_ids"][2] = b["input_ids"][0]
    b["attention_mask"][2] = b["attention_mask"][0]
    h = m.text(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    tokens, _ = m.encode(b)  # no keys: the encoder runs on the batch
    torch.testing.assert_close(tokens["text"], m.text_proj(h))
    pb = m.prepare_batch(b, "cpu")
    assert len(set(pb["text_keys"])) == 2  # rows 0 and 2 are the same question
    tokens, _ = m.encode(pb)
    torch.testing.assert_close(tokens["text"], m.text_proj(h))
    assert len(m.__dict__["_text_cache"]) == 2
    calls = []
    m.text.register_forward_hook(lambda mod, args, kwargs, out: calls.append(1), with_kwargs=True)
    tokens2, _ = m.encode(pb)  # second call: served from the frozen-encoder cache
    assert calls == []
    torch.testing.assert_close(tokens2["text"], tokens["text"])
    m.load_state_dict(m.state_dict())
    assert not m.__dict__.get("_text_cache")


def test_frozen_text_encoder_runs_on_the_batch_itself_when_every_row_is_new():
    """All rows distinct and none cached: the encoder gets the batch's own tensors (no row copies); some
    rows cached: only the others are encoded. Outputs as without the cache either way."""
    torch.manual_seed(0)
    m = FusionModel(ModelConfig(**TINY, text_finetune="frozen")).train()
    pb = m.prepare_batch(make_batch(), "cpu")
    seen = []
    m.text.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    h = m.text_proj(m.text(input_ids=pb["input_ids"], attention_mask=pb["attention_mask"]).last_hidden_state)
    seen.clear()
    tokens, _ = m.encode(pb)
    assert len(seen) == 1 and seen[0] is pb["input_ids"]
    torch.testing.assert_close(tokens["text"], h)
    seen.clear()
    two = m.prepare_batch(make_batch(B=2), "cpu")  # both rows cached: nothing encoded
    m.encode(two)
    assert seen == []
    m.__dict__["_text_cache"].pop(two["text_keys"][1])
    tokens, _ = m.encode(two)
    assert len(seen) == 1 and torch.equal(seen[0], two["input_ids"][1:2])
    torch.testing.assert_close(tokens["text"], h[:2])


def test_prepare_batch_without_attention_mask():
    """input_ids without an attention_mask: moved as given, no cache keys (the forward names what is missing)."""
    m = FusionModel(ModelConfig(**TINY, text_finetune="frozen"))
    b = make_batch()
    del b["attention_mask"]
    pb = m.prepare_batch(b, "cpu")
    assert "text_keys" not in pb and torch.equal(pb["input_ids"], b["input_ids"])


def test_frozen_text_encoder_forward_reads_nothing_back_from_the_device():
    """On a GPU each `.tolist()` / `.item()` / `.cpu()` is a device sync: the cache keys are read from the
    host batch by prepare_batch, before it is moved; the forward itself reads nothing back."""
    from train_fixtures import count_host_reads

    torch.manual_seed(0)
    m = FusionModel(ModelConfig(**TINY, text_finetune="frozen")).train()
    pb = m.prepare_batch(make_batch(), "cpu")
    for _ in range(2):  # fills the cache, then reads from it
        with count_host_reads() as reads:
            m(pb)["loss"].backward()
        assert reads == []
    unfrozen = FusionModel(ModelConfig(**TINY))
    assert "text_keys" not in unfrozen.prepare_batch(make_batch(), "cpu")


def test_text_model_from_a_local_folder(tmp_path):
    """model.text_model_path: any local BERT-family folder instead of the package's MiniLM."""
    from mmkernels.models.text import minilm_path

    cfg = ModelConfig(text_encoder="minilm", text_model_path=minilm_path(), d_model=32, num_heads=2)
    m = FusionModel(cfg)
    assert m.text.config.hidden_size == 384 and m.text.config.num_hidden_layers == 6
    with pytest.raises(FileNotFoundError, match=r"model.text_model_path: .*nowhere is not a folder"):
        FusionModel(ModelConfig(text_encoder="minilm", text_model_path=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    for kind in ("minilm", "random"):  # the encoder and the tokenizer check the folder alike
        with pytest.raises(FileNotFoundError, match=r"model.text_model_path: no config.json in .*empty"):
            FusionModel(ModelConfig(text_encoder=kind, text_model_path=str(tmp_path / "empty")))


def test_save_pretrained_replaces_the_folder_whole(tmp_path, monkeypatch):
    """Written to a temporary folder, then swapped in: a save that fails midway leaves the previous model
    whole (weights and config of the same model), and a finished save leaves no file of the old one."""
    from mmkernels.models import fusion_model
    from safetensors.torch import load_file

    torch.manual_seed(0)
    old = FusionModel(ModelConfig(**TINY))
    path = tmp_path / "best"
    old.save_pretrained(str(path), preprocessing={"max_text_len": 16})
    (path / "stale.txt").write_text("from an older save")
    new = FusionModel(ModelConfig(**dict(TINY, d_model=16)))
    from mmkernels.utils import atomic

    real = atomic.fsync_tree

    def fail_with_every_file_written(p):
        assert sorted(os.listdir(p)) == ["config.json", "model.safetensors", "preprocessing.json"]
        raise OSError("disk full")

    monkeypatch.setattr(atomic, "fsync_tree", fail_with_every_file_written)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(str(path), preprocessing={"max_text_len": 32})
    assert sorted(os.listdir(tmp_path)) == ["best"]  # the failed save's temporary folder is gone
    monkeypatch.setattr(atomic, "fsync_tree", real)
    w = load_file(str(path / "model.safetensors"))
    assert all(torch.equal(w[k], v) for k, v in old.state_dict().items())
    assert fusion_model.load_preprocessing(str(path)) == {"max_text_len": 16}
    new.save_pretrained(str(path), preprocessing={"max_text_len": 32})
    assert FusionModel.from_pretrained(str(path)).config.d_model == 16
    assert not (path / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["best"]  # no temporary or displaced folder left


def test_save_pretrained_fsyncs_each_file_once_before_the_swap(tmp_path, monkeypatch):
    """The files of the temporary folder are written plainly, then fsynced once each (fsync_tree), then
    the folder is swapped in."""
    import stat

    m = FusionModel(ModelConfig(**TINY))
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.basename(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    m.save_pretrained(str(tmp_path / "best"), preprocessing={"max_text_len": 16}, tokenizer=load_tokenizer())
    swap = events.index(("replace", "best"))
    files = [e for e in events if e[0] == "file"]
    assert all(events.index(e) < swap for e in files)
    saved = {os.stat(tmp_path / "best" / f).st_ino for f in os.listdir(tmp_path / "best")}
    assert sorted(ino for _, ino in files) == sorted(saved)  # every file once, nothing else


def test_save_pretrained_does_not_build_the_weights_file_in_memory(tmp_path):
    """The weights go straight to the file (safetensors save_file), not through a bytes copy of it."""
    import tracemalloc

    m = FusionModel(ModelConfig(**TINY))
    size = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    assert size > 4e6
    tracemalloc.start()
    try:
        m.save_pretrained(str(tmp_path / "best"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size / 4, (peak, size)
    w = FusionModel.from_pretrained(str(tmp_path / "best")).state_dict()
    assert all(torch.equal(w[k], v) for k, v in m.state_dict().items())
