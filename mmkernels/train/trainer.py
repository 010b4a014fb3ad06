"""Trainer: AdamW + warmup/cosine (optim.py), clipping, early stopping, bf16 autocast on GPU, atomic
checkpoints (checkpoint.py) with exact resume, DDP under torchrun (distributed.py: gloo on CPU, nccl on
GPU), metrics log and learning-curve plot (run_folder.py), final evaluation report (evaluation.py).

Resume is exact with the number of processes that wrote the checkpoint and its settings that decide
the batches and learning rates (checkpoint.EXACT_RESUME_TRAIN_KEYS; others are refused, naming the
changes); the metrics log is cut back to the checkpoint's step. A training step reads nothing back from the
device: the running loss / accuracy are read once per log interval."""
from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch

from mmkernels.data.avmnist import ANSWERS
from mmkernels.models.fusion_model import FusionModel
from mmkernels.train import run_folder
from mmkernels.train.checkpoint import (CKPT_FORMAT, CKPT_NAME, atomic_torch_save, check_fits, load_checkpoint,
                                        load_training_state, rng_state, seed_everything, set_rng_state)
from mmkernels.train.config import Config, ConfigError
from mmkernels.train.data import epoch_indices, model_tokenizer, prepare_data_dir, training_datasets
from mmkernels.train.distributed import (all_gather_objects, barrier, broadcast_, ddp_model, device_type, dist_info,
                                         process_device, setup_distributed)
from mmkernels.train.evaluation import evaluate, evaluation_report, format_report
from mmkernels.train.optim import lr_factor, make_optimizer
from mmkernels.utils.atomic import write_json

# ----------------------------------------------------------------------------- test hooks
# The environment variables by which the tests interrupt a real run (a subprocess) at a known point, as
# a crash or a kill would; unset (or 0) in any other run:
#   MMKERNELS_KILL_AT_STEP=N          SIGKILL this process right after step N (its checkpoint, if due, written)
#   MMKERNELS_KILL_IN_SAVE_AT_STEP=N  SIGKILL it inside the checkpoint write of step N, between the complete
#                                     temporary file and its rename
RUN_REPORT_NAME = "report.json"  # a finished run's evaluation report, in its output folder
KILL_AT_STEP = "MMKERNELS_KILL_AT_STEP"
KILL_IN_SAVE_AT_STEP = "MMKERNELS_KILL_IN_SAVE_AT_STEP"


def _env_step(name: str) -> int:
    return int(os.environ.get(name, "0") or 0)


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: Config, resume: Optional[str] = None):
        self.cfg = cfg
        t = cfg.train
        world = dist_info()[0]
        if t.batch_size % world:  # before any process group starts
            raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by the number of processes "
                              f"({world})")
        dev = device_type(t.device)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.world, self.rank, local = setup_distributed(dev)
        self.device = process_device(dev, local)
        self.main = self.rank == 0
        # bf16 autocast on GPU only (train.amp bf16 or auto); none on CPU
        self.amp_dtype = torch.bfloat16 if dev == "cuda" and t.amp in ("bf16", "auto") else None
        self.out = t.output_dir
        run_folder.make_run_folder(self.out, self.main)
        self.log_rows: List[dict] = []

        self.data_dir = prepare_data_dir(cfg, progress=t.progress and self.main)
        self.train_ds, self.val_ds = training_datasets(cfg, self.data_dir, model_tokenizer(cfg.model), t.final_eval,
                                                       t.progress and self.main)
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
        self.ddp = ddp_model(self.model, self.device, self.world)
        self.opt = make_optimizer(self.model, t)
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
            run_folder.remove_logs(self.out)

    # -------------------------------------------------------------- setup helpers
    def _trainable(self) -> List[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def _lr_lambda(self, step: int) -> float:
        return lr_factor(step, self.cfg.train, self.total_steps)

    # -------------------------------------------------------------- saved models and checkpoints
    def checkpoint_path(self):
        return os.path.join(self.out, CKPT_NAME)

    def save_model(self, name: str):
        """runs/NAME/{best,last}: weights, config, tokenizer and the input preparation of training."""
        from mmkernels.data.speech import SAMPLE_RATE

        d = self.cfg.data
        preprocessing = {"max_text_len": d.max_text_len, "max_audio_seconds": d.max_audio_seconds,
                         "sample_rate": SAMPLE_RATE}
        self.model.save_pretrained(os.path.join(self.out, name), preprocessing=preprocessing,
                                   tokenizer=model_tokenizer(self.cfg.model))

    def save_checkpoint(self):
        rngs = all_gather_objects(rng_state(), self.world)
        if not self.main:
            return
        ck = {"format": CKPT_FORMAT, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
              "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs,
              "state": dict(self.state), "config": self.cfg.to_dict(), "world_size": self.world,
              "trainable": self._trainable(), "log": self.log_rows,
              "run_metrics": self._run.tolist()}  # the log interval so far (read back here, rank 0 only)
        step = self.state["global_step"]
        kill = _kill_self if step and _env_step(KILL_IN_SAVE_AT_STEP) == step else None  # test hook
        atomic_torch_save(ck, self.checkpoint_path(), before_replace=kill)

    def _resume(self, path: str):
        if os.path.isdir(path):
            path = os.path.join(path, CKPT_NAME)
        ck = load_checkpoint(path)
        cfg = self.cfg.to_dict()
        check_fits(ck, path, self.world, self.cfg.model.labels, cfg)
        load_training_state(ck, path, cfg, self.model, self.opt, self.sched, self.scaler, self._trainable())
        set_rng_state(ck["rng"][self.rank])
        self.state.update(ck["state"])
        self._run = torch.tensor(ck.get("run_metrics", [0.0] * 4), dtype=torch.float32, device=self.device)
        self.log_rows = list(ck.get("log", []))
        if self.main:  # the log as of the checkpoint: rows of later steps are written again
            run_folder.rewrite_jsonl(self.out, self.log_rows)
            self.write_logs()
            print(f"resumed from {path}: epoch {self.state['epoch']}, step {self.state['global_step']}", flush=True)

    # -------------------------------------------------------------- logging
    def log(self, row: dict):
        if self.main:
            self.log_rows.append(row)
            run_folder.append_row(self.out, row)

    def write_logs(self):
        if self.main:
            run_folder.write_csv(self.out, self.log_rows)

    def plot(self):
        if not self.main or not self.cfg.train.plot:
            return None
        return run_folder.plot_learning_curves(self.out, self.log_rows)

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
        broadcast_(stop, self.world)
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
                if kill_at and s["global_step"] == kill_at:  # test hook
                    _kill_self()
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
            write_json(os.path.join(self.out, RUN_REPORT_NAME),
                       {"train": {k: v for k, v in result.items() if k != "report"}, **rep})
            print(format_report(rep), flush=True)
        barrier()
        return result

