"""Tiny configurations for fast tests (tiny data set, tiny model, CPU)."""
from __future__ import annotations

from typing import List

TINY_DATA = ["data.n_train=64", "data.n_val=32", "data.n_test=32", "data.speakers_train=3", "data.speakers_val=2",
             "data.speakers_test=2", "data.images_train=300", "data.images_val=100", "data.images_test=100"]
TINY_MODEL = ["model.d_model=32", "model.num_heads=2", "model.text_hidden=32", "model.text_layers=1",
              "model.text_heads=2", "model.image_channels=8", "model.audio_layers=1", "model.gmu_hidden=32",
              "model.dropout=0.1", "model.aux_digit_loss=0.5"]


def tiny_overrides(cache_dir: str, output_dir: str, **train) -> List[str]:
    t = {"batch_size": 16, "epochs": 2, "lr": 1e-3, "warmup_steps": 2, "ckpt_every": 3, "log_every": 2,
         "progress": False, "plot": False, "final_eval": False, "num_threads": 1, "eval_batch_size": 32,
         "output_dir": output_dir}
    t.update(train)
    return TINY_DATA + TINY_MODEL + [f"data.cache_dir={cache_dir}"] + [f"train.{k}={v}" for k, v in t.items()]
