"""AdamW in parameter groups (weight decay or none; the text encoder at train.text_lr) and the
learning-rate factor of each step: linear warmup, then cosine down to train.min_lr_ratio."""
from __future__ import annotations

import math

import torch

_FUSED_DEVICES = ("cpu", "cuda")


def make_optimizer(model: torch.nn.Module, t) -> torch.optim.AdamW:
    """`t`: the train section of the config. Norms, biases, gates and position tables get no decay."""
    groups = {"decay": [], "no_decay": [], "text_decay": [], "text_no_decay": []}
    for n, p in model.named_parameters():
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
    pg = [g for g in pg if g["params"]]
    # torch's fused AdamW: one kernel over every tensor instead of a Python loop over them (on 2 CPU cores
    # about 12 ms of the fusion model's 170 ms step); it needs floating-point parameters on a device it has
    # a kernel for, otherwise the loop
    fused = all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for g in pg for p in g["params"])
    return torch.optim.AdamW(pg, fused=fused or None)


def lr_factor(step: int, t, total_steps: int) -> float:
    """The factor of the base learning rates at `step` of `total_steps`."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    prog = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))
