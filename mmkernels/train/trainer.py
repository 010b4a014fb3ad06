"""Trainer: AdamW + warmup/cosine, clipping, early stopping, bf16 autocast on GPU, atomic checkpoints
(mmkernels/train/checkpoint.py) with exact resume, DDP under torchrun (gloo on CPU, nccl on GPU), metrics
log, learning-curve plot, final evaluation report.

Resume is exact with the number of processes that wrote the checkpoint and its settings that decide
the batches and learning rates (checkpoint.EXACT_RESUME_TRAIN_KEYS; others are refused, naming the
changes); the metrics log is cut back to the checkpoint's step. A training step reads nothing back from the
device: the running loss / accuracy are read once per log interval."""
from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from mmkernels.data.avmnist import ANSWERS, AVMNISTConfig, AVMNISTQA, build_avmnist
from mmkernels.models.fusion_model import FusionModel
from mmkernels.models.text import load_tokenizer
from mmkernels.train import metrics as M
from mmkernels.train.checkpoint import (CKPT_FORMAT, CKPT_NAME, EXACT_RESUME_TRAIN_KEYS, CheckpointError,
                                        atomic_torch_save, config_changes, does_not_fit, load_checkpoint,
                                        rng_state, set_rng_state)
from mmkernels.train.config import Config, ConfigError
from mmkernels.utils.atomic import atomic_write, remove_stale_temp, write_json


# ----------------------------------------------------------------------------- distributed
def dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def setup_distributed(device_type: str):
    world, rank, local = dist_info()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return world, rank, local


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main():
    return dist_info()[1] == 0


# ----------------------------------------------------------------------------- data
def data_config_of(cfg: Config) -> AVMNISTConfig:
    return AVMNISTConfig(**{f.name: getattr(cfg.data, f.name) for f in fields(AVMNISTConfig)})


def prepare_data_dir(cfg: Config, progress: bool = True) -> Optional[str]:
    """The built AV-MNIST folder (None for data.dataset=jsonl, which reads its files directly)."""
    if cfg.data.dataset == "jsonl":
        return None
    if cfg.data.data_dir:
        return cfg.data.data_dir
    out = None
    if is_main():
        out = build_avmnist(data_config_of(cfg), cache_dir=cfg.data.cache_dir, progress=progress)
    barrier()
    if out is None:
        out = build_avmnist(data_config_of(cfg), cache_dir=cfg.data.cache_dir, progress=False)
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


def epoch_indices(n: int, epoch: int, seed: int, world: int, rank: int) -> List[int]:
    """This rank's sample order for `epoch` (DistributedSampler: same global permutation on every rank)."""
    from torch.utils.data.distributed import DistributedSampler

    class _Len:
        def __len__(self):
            return n

    s = DistributedSampler(_Len(), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    s.set_epoch(epoch)
    return list(iter(s))


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: FusionModel, ds: AVMNISTQA, batch_size: int = 256, drop: Sequence[str] = (),
             device="cpu", amp_dtype=None, progress: bool = False, desc: str = "eval") -> Dict:
    from tqdm.auto import tqdm
    was = model.training
    model.eval()
    preds, golds, qts, losses = [], [], [], []
    tagging = model.config.task == "token_classification"
    n = len(ds)
    for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        b = model.prepare_batch(ds.__getitems__(list(range(i, min(n, i + batch_size)))), device)
        ctx = torch.autocast(device_type="cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        with ctx:
            out = model(b, drop=drop)
        losses.append(out["loss"].detach().float() * len(b["labels"]))  # read back once, after the loop
        preds.append(out["logits"].argmax(-1))
        golds.append(b["labels"])
        qts.append(b["qtype"])
    model.train(was)
    p, g, q = (torch.cat(x).cpu().numpy() for x in (preds, golds, qts))
    losses = float(torch.stack(losses).sum()) if losses else 0.0
    num_labels = model.config.num_labels
    if tagging:  # per token, on the words' first sub-tokens (the rest are -100), plus entity-level F1
        names = model.config.labels or [str(i) for i in range(num_labels)]
        keep = g != -100
        seqs = [([names[t] for t in pr[k]], [names[t] for t in go[k]]) for pr, go, k in zip(p, g, keep)]
        ent = M.entity_f1([s[0] for s in seqs], [s[1] for s in seqs])
        return {"loss": losses / max(1, n), "accuracy": M.accuracy(p[keep], g[keep]),
                "macro_f1": M.macro_f1(p[keep], g[keep], num_labels), "entity_f1": ent["f1"], "n": int(n),
                "per_type": {}}
    types = getattr(ds, "question_types", None)
    return {"loss": losses / max(1, n), "accuracy": M.accuracy(p, g),
            "macro_f1": M.macro_f1(p, g, num_labels), "n": int(n),
            "per_type": M.grouped_accuracy(p, g, q, types) if types else {}}


def check_labels_fit(model_config, dataset: str) -> None:
    """A model trained on its own labels cannot be scored on the AV-MNIST answers (and back)."""
    own = model_config.labels is not None and list(model_config.labels) != list(ANSWERS)
    if dataset == "avmnist" and own:
        raise ValueError(f"this model's labels {list(model_config.labels)[:5]} are not the AV-MNIST answers: "
                         "evaluate it on its own data (a config with data.dataset=jsonl and data.test_file)")


def evaluation_report(model: FusionModel, data_dir: Optional[str], max_text_len: int, batch_size: int = 256,
                      device="cpu", amp_dtype=None, progress: bool = False, cfg: Optional[Config] = None,
                      tokenizer=None) -> Dict:
    """Accuracy overall and per question type on test, on the held-out phrasings, and on test with
    each modality removed in turn (data.dataset=jsonl: its test file, given through cfg)."""
    rep = {}
    tok = tokenizer or model_tokenizer(model.config)
    heldout = None
    if data_dir is None:
        if cfg is None or cfg.data.dataset != "jsonl":
            raise ValueError("evaluation_report: no data folder and no data.dataset=jsonl config")
        test = jsonl_dataset(cfg, model.config, "test", tok)
    else:
        check_labels_fit(model.config, "avmnist")
        test = load_dataset(data_dir, "test", max_text_len, tok)
        if os.path.exists(os.path.join(data_dir, "test_heldout.pt")):
            heldout = load_dataset(data_dir, "test_heldout", max_text_len, tok)
    rep["test"] = evaluate(model, test, batch_size, (), device, amp_dtype, progress, "test")
    if heldout is not None:
        rep["test_heldout_phrasings"] = evaluate(model, heldout, batch_size, (), device, amp_dtype, progress,
                                                 "held-out")
    if len(model.modalities) > 1:
        for m in model.modalities:
            rep[f"test_without_{m}"] = evaluate(model, test, batch_size, (m,), device, amp_dtype, progress, f"-{m}")
    return rep


def format_report(rep: Dict) -> str:
    """One line per split: accuracy, macro-F1, entity F1 (tagging) and accuracy per question type."""
    cols = list(dict.fromkeys(c for r in rep.values() for c in r.get("per_type", {})))
    ent = any("entity_f1" in r for r in rep.values())
    head = f"{'split':<26} {'acc':>6} {'mF1':>6} " + (f"{'entF1':>6} " if ent else "")
    lines = [head + " ".join(f"{c:>7}" for c in cols), "-" * (len(head) + 8 * len(cols))]
    for k, r in rep.items():
        lines.append(f"{k:<26} {100 * r['accuracy']:6.2f} {100 * r['macro_f1']:6.2f} "
                     + (f"{100 * r.get('entity_f1', float('nan')):6.2f} " if ent else "")
                     + " ".join(f"{100 * r['per_type'].get(c, float('nan')):7.2f}" for c in cols))
    return "\n".join(lines)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- trainer
# Tests only: SIGKILL this process right after step N / inside the checkpoint write of step N, between
# the complete temporary file and its rename.
KILL_AT_STEP = "MMKERNELS_KILL_AT_STEP"
KILL_IN_SAVE_AT_STEP = "MMKERNELS_KILL_IN_SAVE_AT_STEP"
METRICS_JSONL, METRICS_CSV = "metrics.jsonl", "metrics.csv"


def _env_step(name: str) -> int:
    return int(os.environ.get(name, "0") or 0)


class Trainer:
    def __init__(self, cfg: Config, resume: Optional[str] = None):
        self.cfg = cfg
        t = cfg.train
        world = dist_info()[0]
        if t.batch_size % world:  # before any process group starts
            raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by the number of processes "
                              f"({world})")
        dev = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if dev == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device=cuda, but no CUDA device is available (train.device=auto uses one "
                              "when there is)")
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.world, self.rank, local = setup_distributed(dev)
        self.device = torch.device(f"cuda:{local}" if dev == "cuda" else "cpu")
        if dev == "cuda":
            torch.cuda.set_device(self.device)
        self.main = self.rank == 0
        self.amp_dtype = torch.bfloat16 if (t.amp == "bf16" or (t.amp == "auto" and dev == "cuda")) else None
        if self.amp_dtype is not None and dev != "cuda":
            self.amp_dtype = None
        self.out = t.output_dir
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ConfigError(f"train.output_dir {self.out} is not a folder")
        try:
            os.makedirs(self.out, exist_ok=True)
        except OSError as e:  # a parent is a file, no permission, read-only file system...
            raise ConfigError(f"train.output_dir {self.out} cannot be made: {e.strerror or e}") from e
        if self.main:  # what a killed run was writing (its complete files are in place)
            remove_stale_temp(self.out)
        self.log_rows: List[dict] = []

        self.data_dir = prepare_data_dir(cfg, progress=t.progress and self.main)
        tok = model_tokenizer(cfg.model)
        if cfg.data.dataset == "jsonl":
            from mmkernels.data.jsonl import label_names, read_jsonl

            for split in ("train", "val", "test"):  # run_config.json must work from any folder
                f = getattr(cfg.data, f"{split}_file")
                setattr(cfg.data, f"{split}_file", os.path.abspath(f) if f else f)

            def labels_of(split):  # the JSON alone: cheap next to the images and audio loaded below
                return label_names(read_jsonl(getattr(cfg.data, f"{split}_file"), cfg.model.task,
                                              cfg.model.modalities), cfg.model.task)

            if cfg.model.labels is None:  # the train file's labels (kept with the saved model)
                cfg.model.labels = labels_of("train")
            cfg.model.num_labels = len(cfg.model.labels)
            if t.final_eval:  # a bad test file must fail now, not after the training
                unknown = sorted(set(labels_of("test")) - set(cfg.model.labels))
                if unknown:
                    raise ConfigError(f"{cfg.data.test_file}: labels {unknown} are not in the train file's")
            self.train_ds = jsonl_dataset(cfg, cfg.model, "train", tok, t.progress and self.main)
            self.val_ds = jsonl_dataset(cfg, cfg.model, "val", tok, t.progress and self.main)
        else:
            self.train_ds = load_dataset(self.data_dir, "train", cfg.data.max_text_len, tok)
            self.val_ds = load_dataset(self.data_dir, "val", cfg.data.max_text_len, tok)
        self.steps_per_epoch = len(self.train_ds) // t.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train set has {len(self.train_ds)} samples, fewer than one batch "
                              f"(train.batch_size={t.batch_size})")
        if len(self.val_ds) == 0:
            raise ConfigError("val set is empty: early stopping and the best model need one")

        seed_everything(t.seed)
        if cfg.model.labels is None:
            cfg.model.labels = list(ANSWERS)
        try:
            self.model = FusionModel(cfg.model).to(self.device)
        except ValueError as e:  # a model setting the config types cannot check (text encoder kind, policy)
            raise ConfigError(str(e)) from e
        positions = getattr(getattr(self.model, "text", None), "config", None)
        positions = getattr(positions, "max_position_embeddings", None)
        if positions is not None and cfg.data.max_text_len > positions:
            raise ConfigError(f"data.max_text_len ({cfg.data.max_text_len}) is more than the text encoder's "
                              f"{positions} positions")
        self.ddp = None
        if self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.opt = self._make_optimizer()
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_lambda)
        self.scaler = torch.amp.GradScaler(enabled=False)  # bf16 needs no loss scaling; kept for the checkpoint format
        self.state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_metric": -math.inf,
                      "best_step": -1, "bad_evals": 0, "stopped": False, "elapsed": 0.0}
        # running train metrics of the current log interval, on the device: loss x rows, rows, hits, scored
        self._run = torch.zeros(4, device=self.device)
        if resume:
            self._resume(resume)
        elif self.main:  # a fresh run starts a fresh log
            for f in (METRICS_JSONL, METRICS_CSV):
                if os.path.exists(os.path.join(self.out, f)):
                    os.remove(os.path.join(self.out, f))

    # -------------------------------------------------------------- setup helpers
    def _make_optimizer(self):
        t = self.cfg.train
        groups = {"decay": [], "no_decay": [], "text_decay": [], "text_no_decay": []}
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            nd = p.dim() < 2 or "norm" in n.lower() or n.endswith("head_gate") or n.endswith("ff_gate") \
                or n.endswith("modality_bias") or ".pos" in n or n.startswith("image.pos") or n.startswith("audio.pos")
            key = ("text_" if n.startswith("text.") else "") + ("no_decay" if nd else "decay")
            groups[key].append(p)
        tl = t.text_lr if t.text_lr is not None else t.lr
        pg = [{"params": groups["decay"], "weight_decay": t.weight_decay, "lr": t.lr},
              {"params": groups["no_decay"], "weight_decay": 0.0, "lr": t.lr},
              {"params": groups["text_decay"], "weight_decay": t.weight_decay, "lr": tl},
              {"params": groups["text_no_decay"], "weight_decay": 0.0, "lr": tl}]
        return torch.optim.AdamW([g for g in pg if g["params"]])

    def _trainable(self) -> List[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def _lr_lambda(self, step: int) -> float:
        t = self.cfg.train
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        prog = min(1.0, (step - t.warmup_steps) / max(1, self.total_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    def checkpoint_path(self):
        return os.path.join(self.out, CKPT_NAME)

    def _gather_rng(self):
        st = rng_state()
        if self.world > 1:
            allst = [None] * self.world
            dist.all_gather_object(allst, st)
            return allst
        return [st]

    def save_model(self, name: str):
        """runs/NAME/{best,last}: weights, config, tokenizer and the input preparation of training."""
        from mmkernels.data.speech import SAMPLE_RATE

        d = self.cfg.data
        preprocessing = {"max_text_len": d.max_text_len, "max_audio_seconds": d.max_audio_seconds,
                         "sample_rate": SAMPLE_RATE}
        self.model.save_pretrained(os.path.join(self.out, name), preprocessing=preprocessing,
                                   tokenizer=model_tokenizer(self.cfg.model))

    def save_checkpoint(self):
        rngs = self._gather_rng()
        if not self.main:
            return
        ck = {"format": CKPT_FORMAT, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
              "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs,
              "state": dict(self.state), "config": self.cfg.to_dict(), "world_size": self.world,
              "trainable": self._trainable(), "log": self.log_rows,
              "run_metrics": self._run.tolist()}  # the log interval so far (read back here, rank 0 only)
        kill = None
        step = self.state["global_step"]
        if step and _env_step(KILL_IN_SAVE_AT_STEP) == step:
            def kill():
                os.kill(os.getpid(), signal.SIGKILL)
        atomic_torch_save(ck, self.checkpoint_path(), before_replace=kill)

    def _resume(self, path: str):
        if os.path.isdir(path):
            path = os.path.join(path, CKPT_NAME)
        ck = load_checkpoint(path)
        ck_world = int(ck.get("world_size", 1))
        if ck_world != self.world:  # per-process RNG states and sample split: exact only with as many
            how = ("python -m mmkernels.train, without torchrun" if ck_world == 1 else
                   f"python -m torch.distributed.run --nproc_per_node {ck_world} -m mmkernels.train ...")
            raise CheckpointError(f"checkpoint {path} was written by {ck_world} processes, this run has "
                                  f"{self.world}: resume it with {ck_world} ({how}), or start a new run in "
                                  "another train.output_dir")
        ck_labels = ck["config"].get("model", {}).get("labels")
        if ck_labels is not None and list(ck_labels) != list(self.cfg.model.labels):
            raise CheckpointError(f"checkpoint {path} was trained with labels {ck_labels}, this run has "
                                  f"{self.cfg.model.labels} (did the train file change?)")
        cfg = self.cfg.to_dict()
        if config_changes(ck["config"], cfg, "train", EXACT_RESUME_TRAIN_KEYS):
            raise does_not_fit(path, "data order or learning-rate schedule", ck["config"], cfg, section="train",
                               keys=EXACT_RESUME_TRAIN_KEYS)
        try:
            self.model.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise does_not_fit(path, "model", ck["config"], cfg, "other parameter names or shapes") from e
        if "trainable" in ck and list(ck["trainable"]) != self._trainable():
            n = len(set(ck["trainable"]) ^ set(self._trainable()))
            raise does_not_fit(path, "optimizer", ck["config"], cfg, f"{n} parameters trained in one and not the other")
        try:
            self.opt.load_state_dict(ck["optimizer"])
            self.sched.load_state_dict(ck["scheduler"])
            self.scaler.load_state_dict(ck.get("scaler", {}))
        except (ValueError, KeyError, RuntimeError) as e:
            raise does_not_fit(path, "optimizer", ck["config"], cfg, "other parameter groups") from e
        set_rng_state(ck["rng"][self.rank])
        self.state.update(ck["state"])
        self._run = torch.tensor(ck.get("run_metrics", [0.0] * 4), dtype=torch.float32, device=self.device)
        self.log_rows = list(ck.get("log", []))
        if self.main:  # the log as of the checkpoint: rows of later steps are written again
            atomic_write(os.path.join(self.out, METRICS_JSONL),
                         lambda f: f.write("".join(json.dumps(r) + "\n" for r in self.log_rows)), mode="w")
            self.write_logs()
            print(f"resumed from {path}: epoch {self.state['epoch']}, step {self.state['global_step']}", flush=True)

    # -------------------------------------------------------------- logging
    def log(self, row: dict):
        if not self.main:
            return
        self.log_rows.append(row)
        with open(os.path.join(self.out, METRICS_JSONL), "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_logs(self):
        if not self.main:
            return
        keys = sorted({k for r in self.log_rows for k in r if not isinstance(r[k], dict)})

        def write(f):
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in self.log_rows:
                w.writerow(r)

        atomic_write(os.path.join(self.out, METRICS_CSV), write, mode="w")

    def plot(self):
        if not self.main or not self.cfg.train.plot:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no learning-curve plot", file=sys.stderr)
            return None
        tr = [r for r in self.log_rows if r.get("split") == "train"]
        va = [r for r in self.log_rows if r.get("split") == "val"]
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        ax[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train")
        ax[0].plot([r["step"] for r in va], [r["loss"] for r in va], "o-", label="val")
        ax[0].set_xlabel("step"); ax[0].set_ylabel("loss"); ax[0].set_yscale("log"); ax[0].legend()
        ax[1].plot([r["step"] for r in tr], [r["accuracy"] for r in tr], label="train (running)")
        ax[1].plot([r["step"] for r in va], [r["accuracy"] for r in va], "o-", label="val")
        ax[1].set_xlabel("step"); ax[1].set_ylabel("accuracy"); ax[1].legend()
        fig.tight_layout()
        p = os.path.join(self.out, "learning_curves.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        return p

    # -------------------------------------------------------------- loop
    def _validate(self):
        """Evaluate on val (rank 0), update early stopping; returns True if training should stop."""
        t = self.cfg.train
        stop = torch.zeros(1, device=self.device)  # nccl broadcasts device tensors only
        if self.main:
            r = evaluate(self.model, self.val_ds, t.eval_batch_size, (), self.device, self.amp_dtype)
            s = self.state
            self.log({"split": "val", "step": s["global_step"], "epoch": s["epoch"],
                      **{k: v for k, v in r.items() if k != "n"}})
            val = r[t.metric]
            if val > s["best_metric"]:
                s["best_metric"], s["best_step"], s["bad_evals"] = val, s["global_step"], 0
                self.save_model("best")
            else:
                s["bad_evals"] += 1
            if t.progress:
                print(f"step {s['global_step']} epoch {s['epoch']}: val loss {r['loss']:.4f} acc {r['accuracy']:.4f} "
                      f"(best {s['best_metric']:.4f} @ {s['best_step']})", flush=True)
            if t.early_stopping_patience and s["bad_evals"] >= t.early_stopping_patience:
                print(f"early stopping: no improvement of val {t.metric} for {s['bad_evals']} evaluations", flush=True)
                stop[0] = 1
        if self.world > 1:
            dist.broadcast(stop, 0)
        return bool(stop[0])

    def _train_step(self, model, batch: Dict) -> None:
        """One optimizer step on a prepared batch. Reads nothing back from the device: the running
        metrics are added up there (read once per log interval by _log_train)."""
        t = self.cfg.train
        ctx = torch.autocast(device_type="cuda", dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with ctx:
            out = model(batch)
        loss = out["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            labels = batch["labels"]
            scored = labels != -100  # token classification: words' first sub-tokens only
            rows = labels.shape[0]
            self._run[0].add_(loss.detach().float() * rows)
            self._run[1].add_(rows)
            self._run[2].add_(((out["logits"].argmax(-1) == labels) & scored).sum())
            self._run[3].add_(scored.sum())

    def _log_train(self, bar, t0: float) -> None:
        """The train row of the log interval just ended: its one read back from the device."""
        s = self.state
        if self.main:
            loss_sum, rows, hits, scored = self._run.tolist()
            row = {"split": "train", "step": s["global_step"], "epoch": s["epoch"], "loss": loss_sum / max(1.0, rows),
                   "accuracy": hits / max(1.0, scored), "lr": self.sched.get_last_lr()[0],
                   "time": round(time.time() - t0, 2)}
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}")
            self.log(row)
        self._run.zero_()

    def train(self) -> Dict:
        from tqdm.auto import tqdm
        t, s = self.cfg.train, self.state
        model = self.ddp or self.model
        model.train()
        kill_at = _env_step(KILL_AT_STEP)
        t0 = time.time() - s["elapsed"]
        per_rank = t.batch_size // self.world
        stop = s["stopped"]
        while not stop and s["epoch"] < t.epochs and s["global_step"] < self.total_steps:
            idx = epoch_indices(len(self.train_ds), s["epoch"], t.seed, self.world, self.rank)
            nb = len(idx) // per_rank
            bar = tqdm(total=nb, initial=s["step_in_epoch"], desc=f"epoch {s['epoch']}",
                       disable=not (t.progress and self.main), dynamic_ncols=True)
            while s["step_in_epoch"] < nb:
                j = s["step_in_epoch"]
                batch = self.model.prepare_batch(self.train_ds.__getitems__(idx[j * per_rank:(j + 1) * per_rank]),
                                                 self.device)
                self._train_step(model, batch)
                s["step_in_epoch"] += 1
                s["global_step"] += 1
                bar.update(1)
                if t.log_every and s["global_step"] % t.log_every == 0:
                    self._log_train(bar, t0)
                out_of_time = t.max_minutes and (time.time() - t0) > 60 * t.max_minutes
                if s["step_in_epoch"] == nb:
                    s["epoch"] += 1
                    s["step_in_epoch"] = 0
                end = s["global_step"] >= self.total_steps or out_of_time
                if (t.eval_every and s["global_step"] % t.eval_every == 0) or (not t.eval_every and s["step_in_epoch"] == 0) or end:
                    stop = self._validate() or bool(end)
                    model.train()
                s["elapsed"] = time.time() - t0
                s["stopped"] = bool(stop)
                if (t.ckpt_every and s["global_step"] % t.ckpt_every == 0) or s["step_in_epoch"] == 0 or stop:
                    self.save_checkpoint()
                    self.write_logs()
                if kill_at and s["global_step"] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop or s["step_in_epoch"] == 0:
                    break
            bar.close()
        s["elapsed"] = time.time() - t0
        result = {"steps": s["global_step"], "epochs": s["epoch"], "best_val": s["best_metric"],
                  "best_step": s["best_step"], "train_seconds": round(s["elapsed"], 1)}
        if self.main:
            self.save_checkpoint()
            self.write_logs()
            self.save_model("last")
            if not os.path.exists(os.path.join(self.out, "best", "config.json")):
                self.save_model("best")
            write_json(os.path.join(self.out, "run_config.json"), {**self.cfg.to_dict(), "data_dir": self.data_dir})
            p = self.plot()
            if p:
                result["plot"] = p
        else:
            self.save_checkpoint()  # participates in the RNG gather
        if self.main and t.final_eval:
            best = FusionModel.from_pretrained(os.path.join(self.out, "best")).to(self.device)
            rep = evaluation_report(best, self.data_dir, self.cfg.data.max_text_len, t.eval_batch_size,
                                    self.device, self.amp_dtype, progress=t.progress, cfg=self.cfg)
            result["report"] = rep
            write_json(os.path.join(self.out, "report.json"),
                       {"train": {k: v for k, v in result.items() if k != "report"}, **rep})
            print(format_report(rep), flush=True)
        barrier()
        return result


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
