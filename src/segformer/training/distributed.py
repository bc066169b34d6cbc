"""A training process's place in a ``torchrun`` job (or a single process), its device, and the
few collectives the loop needs. Without torchrun every function here is a plain local one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from segformer.errors import SegformerError

__all__ = [
    "Distributed",
    "all_true",
    "gather_objects",
    "mean_across",
    "setup_distributed",
    "sync_buffers",
]


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """The process's place in a torchrun job (or a single process) and its device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise SegformerError(f"device {device_name!r} requested but CUDA is not available")
    if world_size > 1:
        info = Distributed(
            int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0"))
        )
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(info.local_rank)
            return info, torch.device("cuda", info.local_rank)
        return info, torch.device("cpu")
    if cuda:
        return Distributed(), torch.device(
            device_name if device_name.startswith("cuda") else "cuda"
        )
    return Distributed(), torch.device("cpu")


def sync_buffers(model: nn.Module, process: Distributed) -> None:
    """Give every process rank 0's BatchNorm statistics, so evaluation and the saved model
    agree across processes (DDP syncs buffers only at the start of a forward pass)."""
    if process.active:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def mean_across(value: Tensor, process: Distributed) -> float:
    """The mean of a scalar tensor over all processes."""
    if process.active:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= process.world_size
    return float(value)


def all_true(flag: bool, process: Distributed, device: torch.device) -> bool:
    """Whether ``flag`` holds in every process: all of them take the same branch afterwards,
    so none is left waiting forever in a collective the others skipped."""
    value = torch.tensor(int(flag), dtype=torch.int32, device=device)
    if process.active:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


def gather_objects(value: Any, process: Distributed) -> list[Any]:
    """Every process's ``value``, in rank order (a one-element list in a single process)."""
    if not process.active:
        return [value]
    gathered: list[Any] = [None] * process.world_size
    dist.all_gather_object(gathered, value)
    return gathered
