"""The data of a run: the built AV-MNIST folder or the JSON lines files (data.dataset=jsonl), their
splits prepared for the model, the tokenizer of its text encoder, each process's sample order."""
from __future__ import annotations

import os
from dataclasses import fields
from typing import List, Optional

from mmkernels.data.avmnist import AVMNISTConfig, AVMNISTQA, build_avmnist
from mmkernels.models.text import load_tokenizer
from mmkernels.train.config import Config, ConfigError
from mmkernels.train.distributed import barrier, is_main


def data_config_of(cfg: Config) -> AVMNISTConfig:
    return AVMNISTConfig(**{f.name: getattr(cfg.data, f.name) for f in fields(AVMNISTConfig)})


def prepare_data_dir(cfg: Config, progress: bool = True) -> Optional[str]:
    """The built AV-MNIST folder (None for data.dataset=jsonl, which reads its files directly)."""
    if cfg.data.dataset == "jsonl":
        return None
    if cfg.data.data_dir:
        return cfg.data.data_dir
    out = None
    try:
        if is_main():
            out = build_avmnist(data_config_of(cfg), cache_dir=cfg.data.cache_dir, progress=progress)
        barrier()
        if out is None:
            out = build_avmnist(data_config_of(cfg), cache_dir=cfg.data.cache_dir, progress=False)
    except ValueError as e:  # the data settings name something the sources do not have (no recordings, speaker)
        raise ConfigError(str(e)) from e
    return out


def load_dataset(data_dir: str, split: str, max_text_len: int, tokenizer=None) -> AVMNISTQA:
    return AVMNISTQA(os.path.join(data_dir, f"{split}.pt"), tokenizer or load_tokenizer(), max_text_len)


def jsonl_dataset(cfg: Config, model_config, split: str, tokenizer, progress: bool = False):
    """One split of data.dataset=jsonl, prepared for the model (its task, modalities and labels)."""
    from mmkernels.data.jsonl import JsonlDataset

    return JsonlDataset(getattr(cfg.data, f"{split}_file"), tokenizer, model_config.labels, model_config.task,
                        model_config.modalities, cfg.data.max_text_len, cfg.data.max_audio_seconds, progress)


def model_tokenizer(model_config):
    """The tokenizer of the model's text encoder (model.text_model_path, else the package's MiniLM)."""
    return load_tokenizer(getattr(model_config, "text_model_path", None))


def training_datasets(cfg: Config, data_dir: Optional[str], tok, check_test: bool, progress: bool):
    """The train and val splits of a run. data.dataset=jsonl: the files' paths are made absolute
    (run_config.json must work from any folder), model.labels (the train file's unless given) and
    model.num_labels are set, and with `check_test` the test file's labels are checked first."""
    if cfg.data.dataset != "jsonl":
        return (load_dataset(data_dir, "train", cfg.data.max_text_len, tok),
                load_dataset(data_dir, "val", cfg.data.max_text_len, tok))
    from mmkernels.data.jsonl import label_names, read_jsonl

    for split in ("train", "val", "test"):
        f = getattr(cfg.data, f"{split}_file")
        setattr(cfg.data, f"{split}_file", os.path.abspath(f) if f else f)

    def labels_of(split):  # the JSON alone: cheap next to the images and audio loaded below
        return label_names(read_jsonl(getattr(cfg.data, f"{split}_file"), cfg.model.task, cfg.model.modalities),
                           cfg.model.task)

    if cfg.model.labels is None:  # the train file's labels (kept with the saved model)
        cfg.model.labels = labels_of("train")
    cfg.model.num_labels = len(cfg.model.labels)
    if check_test:  # a bad test file must fail now, not after the training
        unknown = sorted(set(labels_of("test")) - set(cfg.model.labels))
        if unknown:
            raise ConfigError(f"{cfg.data.test_file}: labels {unknown} are not in the train file's")
    return (jsonl_dataset(cfg, cfg.model, "train", tok, progress),
            jsonl_dataset(cfg, cfg.model, "val", tok, progress))


def epoch_indices(n: int, epoch: int, seed: int, world: int, rank: int) -> List[int]:
    """This rank's sample order for `epoch` (DistributedSampler: same global permutation on every rank)."""
    from torch.utils.data.distributed import DistributedSampler

    class _Len:
        def __len__(self):
            return n

    s = DistributedSampler(_Len(), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    s.set_epoch(epoch)
    return list(iter(s))
