"""The processes of a torchrun launch: ranks from the environment, each process's device, the process
group (gloo on CPU, nccl on GPU), the DDP model and the collectives the trainer uses. Each is a no-op in a
single process."""
from __future__ import annotations

import os
from typing import Any, List

import torch
import torch.distributed as dist

from mmkernels.train.config import ConfigError


def dist_info():
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def device_type(setting: str) -> str:
    """train.device: cpu, cuda (refused without a CUDA device) or auto (cuda when there is one)."""
    dev = setting if setting != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda, but no CUDA device is available (train.device=auto uses one "
                          "when there is)")
    return dev


def process_device(dev: str, local: int) -> torch.device:
    """This process's device: GPU `local` (made the current one) on cuda."""
    device = torch.device(f"cuda:{local}" if dev == "cuda" else "cpu")
    if dev == "cuda":
        torch.cuda.set_device(device)
    return device


def setup_distributed(device_type: str):
    world, rank, local = dist_info()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return world, rank, local


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main():
    return dist_info()[1] == 0


def ddp_model(model: torch.nn.Module, device: torch.device, world: int):
    """`model` in DistributedDataParallel under torchrun; None in a single process."""
    if world <= 1:
        return None
    return torch.nn.parallel.DistributedDataParallel(model,
                                                     device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_(tensor: torch.Tensor, world: int, src: int = 0) -> torch.Tensor:
    """`tensor` of process `src` on every process, in place (nccl: a device tensor)."""
    if world > 1:
        dist.broadcast(tensor, src)
    return tensor


def all_gather_objects(obj: Any, world: int) -> List[Any]:
    """Every process's `obj`, in rank order, on every process."""
    if world > 1:
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out
    return [obj]
