"""Run configuration: YAML file with sections data / model / train, plus `section.key=value` overrides.
Unknown keys are errors that name the key (with a suggestion)."""
from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional

import yaml

from mmkernels.data.avmnist import AVMNISTConfig
from mmkernels.models.fusion_model import ModelConfig


class ConfigError(ValueError):
    """Bad configuration (unknown key, wrong type, unreadable file)."""


@dataclass
class DataConfig(AVMNISTConfig):
    """The data set's own settings (AVMNISTConfig: sizes, speakers, seed, speech_dir) plus where it lives."""
    dataset: str = "avmnist"            # avmnist | jsonl (your own data: mmkernels/data/jsonl.py)
    train_file: Optional[str] = None    # jsonl: JSON lines files of the splits
    val_file: Optional[str] = None
    test_file: Optional[str] = None
    cache_dir: Optional[str] = None     # default ~/.cache/mmkernels or $MMKERNELS_CACHE
    data_dir: Optional[str] = None      # an already-built data folder ({split}.pt); skips building
    max_text_len: int = 24


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    epochs: int = 10
    max_steps: int = 0                  # 0: epochs decide
    max_minutes: float = 0.0            # 0: no time budget; else stop (and evaluate) after this many minutes
    batch_size: int = 64                # global batch (split over DDP ranks)
    eval_batch_size: int = 256
    lr: float = 2e-3
    text_lr: Optional[float] = None     # lr of the (pretrained) text encoder; default lr
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 0                 # steps; 0: at the end of every epoch
    early_stopping_patience: int = 3    # evaluations without improvement of `metric`
    metric: str = "accuracy"            # accuracy | macro_f1 | entity_f1 (token classification)
    ckpt_every: int = 200               # steps; checkpoints are also written at the end of each epoch
    log_every: int = 20
    amp: str = "auto"                   # auto (bf16 autocast on GPU) | bf16 | none
    device: str = "auto"                # auto | cpu | cuda
    num_threads: int = 0                # torch CPU threads; 0 = torch default
    progress: bool = True
    final_eval: bool = True             # report on test / held-out phrasings / modality removal at the end
    plot: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"data": asdict(self.data), "model": asdict(self.model), "train": asdict(self.train)}


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def _suggest(name: str, options) -> str:
    m = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{m[0]}'?)" if m else ""


def _check_keys(d: dict, where: str):
    for sec, val in d.items():
        if sec not in _SECTIONS:
            raise ConfigError(f"unknown config section '{sec}' in {where}{_suggest(sec, _SECTIONS)}; "
                              f"sections: {list(_SECTIONS)}")
        if val is None:
            continue
        if not isinstance(val, dict):
            raise ConfigError(f"config section '{sec}' in {where} must be a mapping, got {type(val).__name__}")
        names = {f.name for f in fields(_SECTIONS[sec])}
        for k in val:
            if k not in names:
                raise ConfigError(f"unknown config key '{sec}.{k}' in {where}{_suggest(k, names)}")


def parse_override(s: str):
    if "=" not in s:
        raise ConfigError(f"override {s!r} must look like section.key=value")
    key, val = s.split("=", 1)
    if "." not in key:
        raise ConfigError(f"override key {key!r} must be section.key (sections: {list(_SECTIONS)})")
    sec, k = key.split(".", 1)
    try:
        v = yaml.safe_load(val) if val != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {s!r}: cannot parse value: {e}") from e
    return sec, k, v


def load_config(path: Optional[str] = None, overrides=(), base: Optional[dict] = None) -> Config:
    d: Dict[str, Dict[str, Any]] = {k: dict(v) for k, v in (base or {}).items()}
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path) as f:
                y = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(y, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(y).__name__}")
        _check_keys(y, path)
        for sec, val in y.items():
            d.setdefault(sec, {}).update(val or {})
    for o in overrides:
        sec, k, v = parse_override(o)
        _check_keys({sec: {k: v}}, f"override {o!r}")
        d.setdefault(sec, {})[k] = v
    _check_keys(d, "config")
    try:
        return Config(data=DataConfig(**d.get("data", {})), model=ModelConfig(**d.get("model", {})),
                      train=TrainConfig(**d.get("train", {})))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config: {e}") from e
