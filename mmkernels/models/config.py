"""The fusion model's config (ModelConfig) and the files of a saved model folder, read without the model's
code (an exported folder is served with these and the exported program only)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import List, Optional

ALL_MODALITIES = ("text", "image", "audio")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# How inputs were prepared in training (text length, audio length and rate): a served model
# must prepare its inputs the same way.
PREPROCESSING_NAME = "preprocessing.json"


@dataclass
class ModelConfig:
    modalities: List[str] = field(default_factory=lambda: list(ALL_MODALITIES))
    d_model: int = 64
    num_heads: int = 4
    fusion_layers: int = 1
    ffn_mult: int = 2
    dropout: float = 0.1
    text_encoder: str = "random"        # random | minilm
    text_model_path: Optional[str] = None  # a local BERT-family folder (weights + tokenizer) instead of the package's MiniLM
    text_hidden: int = 64               # random encoder only
    text_layers: int = 2
    text_heads: int = 2
    text_finetune: str = "all"          # all | frozen | top_k
    text_top_k: int = 2
    text_freeze_embeddings: bool = True  # word embeddings (vocab x hidden) frozen: most of the cost, few tokens used
    image_channels: int = 16
    image_layers: int = 0
    audio_layers: int = 1
    n_mels: int = 40
    audio_frontend: str = "conv1d"      # conv1d (over time, mel bins as channels) | conv2d (over time and frequency)
    # audio augmentation in training (mmkernels/models/augment.py); none in eval, so a saved model serves as trained
    audio_speed_perturb: float = 0.0    # waveform resampled by a factor in [1 - x, 1 + x]
    audio_pitch_perturb: float = 0.0    # mel axis warped by a factor in [1 - x, 1 + x]
    audio_noise_snr: float = 0.0        # white noise at an SNR in [x, x + 30] dB; 0: none
    audio_time_masks: int = 0           # SpecAugment time masks per clip
    audio_freq_masks: int = 0           # SpecAugment frequency masks per clip
    gmu_hidden: int = 128
    task: str = "answer"                # answer | classification | token_classification
    num_labels: int = 21
    aux_digit_loss: float = 0.0         # weight of auxiliary digit losses on the pooled image / audio encodings
    labels: Optional[List[str]] = None  # id -> label name (answers), kept with the saved model
    kernel_backend: Optional[str] = None  # None: mmkernels ops (default dispatch) | "reference" | "cpu" | ...
    bert_config: Optional[dict] = None  # set by save_pretrained: rebuild the text encoder without its source

    def __post_init__(self):
        for k in ("d_model", "num_heads", "ffn_mult", "text_hidden", "text_layers", "text_heads", "image_channels",
                  "n_mels", "gmu_hidden", "num_labels"):
            if not getattr(self, k) >= 1:
                raise ValueError(f"model.{k} must be >= 1, got {getattr(self, k)!r}")
        for k in ("fusion_layers", "image_layers", "audio_layers", "text_top_k", "aux_digit_loss", "audio_noise_snr",
                  "audio_time_masks", "audio_freq_masks"):
            if not getattr(self, k) >= 0:  # NaN too
                raise ValueError(f"model.{k} must be >= 0, got {getattr(self, k)!r}")
        for k in ("audio_speed_perturb", "audio_pitch_perturb"):
            if not 0 <= getattr(self, k) < 0.5:
                raise ValueError(f"model.{k} must be in [0, 0.5), got {getattr(self, k)!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.num_heads ({self.num_heads})")
        bad = [m for m in self.modalities if m not in ALL_MODALITIES]
        if bad or not self.modalities:
            raise ValueError(f"model.modalities must be a non-empty subset of {list(ALL_MODALITIES)}, got {self.modalities}")
        if self.audio_frontend not in ("conv1d", "conv2d"):
            raise ValueError(f"model.audio_frontend must be 'conv1d' or 'conv2d', got {self.audio_frontend!r}")
        if "text" not in self.modalities and self.task == "token_classification":
            raise ValueError("model.task token_classification needs the text modality")
        if self.task not in ("answer", "classification", "token_classification"):
            raise ValueError(f"model.task must be answer|classification|token_classification, got {self.task!r}")


def read_config(path: str) -> ModelConfig:
    """The ModelConfig saved in the folder `path` (save_pretrained, or an exported folder)."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"not a saved mmkernels model: {cfg_path} is missing")
    with open(cfg_path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON: {e}") from e
    d.pop("model_type", None)
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cfg_path}: unknown config key(s) {unknown}")
    return ModelConfig(**d)


def load_preprocessing(path: str) -> dict:
    """The preprocessing settings saved beside a model ({} for a folder saved without them)."""
    p = os.path.join(path, PREPROCESSING_NAME)
    if not os.path.exists(p):
        return {}
    with open(p) as f:
        return json.load(f)


def saved_config(model) -> dict:
    """The config.json of a saved model (weights or exported program): its ModelConfig, and the text
    encoder's own config where it has one, so the folder rebuilds without the training config."""
    from dataclasses import asdict

    cfg = {"model_type": "mmkernels-fusion", **asdict(model.config)}
    if hasattr(model, "text"):
        cfg["bert_config"] = model.text.config.to_dict()
    return cfg


def write_plain_json(path: str, obj) -> None:
    """A plain write, for a folder that is fsynced as a whole afterwards (utils.atomic.new_dir)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
