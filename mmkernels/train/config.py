"""Run configuration: YAML file with sections data / model / train, plus `section.key=value` overrides.
Unknown keys are errors that name the key (with a suggestion). Every value, from the file or an
override, is typed the same way from its dataclass field: `1e-3`, `1.0e-3`, `3` and `"3"` are all
numbers for a float, `"3"` is an int for an int, `yes`/`no`/`on`/`off`/`true`/`false` are booleans for
a bool, and a string field (or an item of a list of strings) takes the text as written: `1.5`,
`2024-01-01`, `yes` stay strings (YAML 1.2 reading, no timestamps: `[yes, no]` labels stay strings)."""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from mmkernels.data.avmnist import AVMNISTConfig
from mmkernels.models.fusion_model import ModelConfig


class ConfigError(ValueError):
    """Bad configuration (unknown key, wrong type, unreadable file)."""


def _one_of(name: str, value, options) -> None:
    if value not in options:
        raise ConfigError(f"{name} must be one of {list(options)}, got {value!r}")


def _at_least(name: str, value, low) -> None:
    if not value >= low:  # NaN too
        raise ConfigError(f"{name} must be >= {low}, got {value!r}")


_DATA_SET_FIELDS = {f.name for f in fields(AVMNISTConfig)}


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

    def __post_init__(self):
        _one_of("data.dataset", self.dataset, ("avmnist", "jsonl"))
        _at_least("data.max_text_len", self.max_text_len, 1)
        try:
            super().__post_init__()  # the data set's own settings
        except ValueError as e:
            raise ConfigError(" ".join(f"data.{w}" if w in _DATA_SET_FIELDS else w for w in str(e).split(" "))) from e


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

    def __post_init__(self):
        for k in ("batch_size", "eval_batch_size"):
            _at_least(f"train.{k}", getattr(self, k), 1)
        for k in ("epochs", "max_steps", "max_minutes", "warmup_steps", "eval_every", "early_stopping_patience",
                  "ckpt_every", "log_every", "num_threads", "grad_clip", "weight_decay"):
            _at_least(f"train.{k}", getattr(self, k), 0)
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"train.lr must be > 0 (and finite), got {self.lr!r}")
        if self.text_lr is not None and not 0 <= self.text_lr < math.inf:
            raise ConfigError(f"train.text_lr must be >= 0 (and finite) or null, got {self.text_lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        _one_of("train.metric", self.metric, ("accuracy", "macro_f1", "entity_f1"))
        _one_of("train.amp", self.amp, ("auto", "bf16", "none"))
        _one_of("train.device", self.device, ("auto", "cpu", "cuda"))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"data": asdict(self.data), "model": asdict(self.model), "train": asdict(self.train)}


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


# ----------------------------------------------------------------------------- YAML 1.2 scalars
class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars: booleans are only true/false (`yes`, `no`, `on`,
    `off` stay strings), `1e-3` is a float (YAML 1.1 needs a dot), ints are decimal (`010` is 10), no
    timestamps (`2024-01-01` is a string)."""


class _Dumper(yaml.SafeDumper):
    """Quotes every string that either YAML 1.1 or _Loader would read as something else."""


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_Loader.yaml_implicit_resolvers = {c: [(t, r) for t, r in rs if t not in (_BOOL, _INT, _FLOAT, _TIMESTAMP)]
                                   for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_RESOLVERS = [
    (_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    (_INT, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789")),
    (_FLOAT, re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"
                        r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"), list("-+0123456789.")),
]
for _tag, _rx, _first in _RESOLVERS:
    _Loader.add_implicit_resolver(_tag, _rx, _first)
    _Dumper.add_implicit_resolver(_tag, _rx, _first)
_Loader.add_constructor(_INT, lambda loader, node: int(loader.construct_scalar(node)))


def yaml_load(text_or_file):
    return yaml.load(text_or_file, Loader=_Loader)


def _yaml_load_both(text: str):
    """(values, texts): `text` read by _Loader, and by BaseLoader (every scalar as the string written,
    same lists and mappings): a string field takes the text, whatever the value read."""
    return yaml_load(text), yaml.load(text, Loader=yaml.BaseLoader)


def yaml_dump(obj) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False)


# ----------------------------------------------------------------------------- typing
_NULLS = ("null", "none", "~")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_TYPE_NAMES = {int: "an int", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}


class _WrongType(Exception):
    pass


def _type_name(tp) -> str:
    if get_origin(tp) is Union:
        inner = [a for a in get_args(tp) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0])[2:]}s" if get_args(tp) else "a list"
    return _TYPE_NAMES.get(get_origin(tp) or tp, getattr(tp, "__name__", str(tp)))


def _typed(v, tp, raw=None):
    """`v` as type `tp`; _WrongType if it is not one. raw: `v` as BaseLoader reads it (the text of each
    scalar, in the same lists and mappings), from the file or an override: a string takes its text."""
    if tp is Any:
        return v
    if get_origin(tp) is Union:
        inner = [a for a in get_args(tp) if a is not type(None)]
        if v is None or (isinstance(v, str) and v.strip().lower() in _NULLS):
            return None
        return _typed(v, inner[0], raw)
    if tp is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
            return v.strip().lower() in _TRUE
        raise _WrongType
    if tp is int:
        if isinstance(v, str):
            try:
                v = float(v.strip()) if not re.fullmatch(r"[-+]?[0-9_]+", v.strip()) else int(v.strip())
            except ValueError:
                raise _WrongType from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _WrongType
        if isinstance(v, float) and not v.is_integer():
            raise _WrongType
        return int(v)
    if tp is float:
        if isinstance(v, str):
            try:
                return float(v.strip())
            except ValueError:
                raise _WrongType from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _WrongType
        return float(v)
    if tp is str:
        if isinstance(v, str):
            return v
        if raw is not None and v is not None and not isinstance(v, (list, dict)):
            return raw  # the text as written (`output_dir: 2024`, `train.output_dir=1e3`)
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        raise _WrongType
    if get_origin(tp) is list:
        if not isinstance(v, (list, tuple)):
            raise _WrongType
        (item,) = get_args(tp) or (Any,)
        texts = raw if isinstance(raw, list) and len(raw) == len(v) else [None] * len(v)
        return [_typed(x, item, r) for x, r in zip(v, texts)]
    if tp is dict or get_origin(tp) is dict:
        if not isinstance(v, dict):
            raise _WrongType
        return v
    return v


def _typed_section(sec: str, values: dict, where: Dict[str, str], raw: Dict[str, Any]) -> dict:
    hints = get_type_hints(_SECTIONS[sec])
    out = {}
    for k, v in values.items():
        try:
            out[k] = _typed(v, hints[k], raw.get(k))
        except _WrongType:
            src = where.get(k)
            raise ConfigError(f"{sec}.{k} expects {_type_name(hints[k])}, got {v!r}"
                              + (f" (in {src})" if src else "")) from None
    return out


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
        v, text = _yaml_load_both(val) if val != "" else (None, None)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {s!r}: cannot parse value: {' '.join(str(e).split())}") from e
    return sec, k, v, text


def load_config(path: Optional[str] = None, overrides=(), base: Optional[dict] = None) -> Config:
    d: Dict[str, Dict[str, Any]] = {k: dict(v) for k, v in (base or {}).items()}
    where: Dict[str, Dict[str, str]] = {}   # section -> key -> the file a value came from
    raw: Dict[str, Dict[str, Any]] = {}     # section -> key -> the value as BaseLoader reads it
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path) as f:
                y, texts = _yaml_load_both(f.read())
            y = {} if y is None else y
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from e
        if not isinstance(y, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(y).__name__}")
        _check_keys(y, path)
        for sec, val in y.items():
            d.setdefault(sec, {}).update(val or {})
            where.setdefault(sec, {}).update({k: path for k in (val or {})})
            sec_texts = texts.get(sec) if isinstance(texts, dict) else None
            raw.setdefault(sec, {}).update(sec_texts if isinstance(sec_texts, dict) else {})
    for o in overrides:
        sec, k, v, text = parse_override(o)
        _check_keys({sec: {k: v}}, f"override {o!r}")
        d.setdefault(sec, {})[k] = v
        where.get(sec, {}).pop(k, None)
        raw.setdefault(sec, {})[k] = text
    _check_keys(d, "config")
    typed = {sec: _typed_section(sec, vals or {}, where.get(sec, {}), raw.get(sec, {})) for sec, vals in d.items()}
    try:
        cfg = Config(data=DataConfig(**typed.get("data", {})), model=ModelConfig(**typed.get("model", {})),
                     train=TrainConfig(**typed.get("train", {})))
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config: {e}") from e
    _check_across_sections(cfg)
    return cfg


def _check_across_sections(cfg: Config) -> None:
    if cfg.train.metric == "entity_f1" and cfg.model.task != "token_classification":
        raise ConfigError(f"train.metric entity_f1 needs model.task=token_classification (model.task is "
                          f"{cfg.model.task!r}); other tasks: accuracy | macro_f1")
