"""Multi-process training on PyTorch's own engine (DistributedDataParallel, started by torchrun).

Under `torchrun` (WORLD_SIZE > 1) every rank runs the same loop on its share of each global batch:
rank r takes positions r, r + world, ... of the batch, so the batch a step sees, and the order of
batches, do not depend on the number of processes (a run can resume with another world size). Rank 0
alone writes checkpoints, metrics and the summary, and evaluates the validation set; the others wait
for its verdict so early stopping stays in step.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from edgekd.errors import RecipeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, *values: float) -> list[float]:
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: Any) -> list[Any]:
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    @contextlib.contextmanager
    def node_main_first(self):
        """Let one process per node build shared files (decode cache, teacher logits), then the rest."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    def describe(self) -> dict:
        return {"world_size": self.world, "backend": self.backend, "processes_per_node": self.local_world}


def check_world_size(batch_size: int, world: int) -> None:
    """Refuse a global batch that does not split evenly over `world` processes (before any starts)."""
    if world > 1 and batch_size % world:
        raise RecipeError(f"train.batch_size {batch_size} does not split evenly over {world} processes",
                          hint=f"use a multiple of {world} (it is the global batch size), e.g. "
                               f"--set train.batch_size={max(world, batch_size // world * world)}")


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device is cuda but PyTorch sees no CUDA device",
                          hint="set train.device=auto (uses CUDA when present, else CPU)")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def start(device_setting: str) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun set up (or run alone); returns this process's place and device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_setting)
    if world == 1:
        return Distributed(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:  # share the node's cores between its processes instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    context = Distributed(dist.get_rank(), dist.get_world_size(), local_rank, local_world, backend)
    if not context.main:
        logging.getLogger("edgekd").setLevel(logging.WARNING)
    return context, device


def stop(context: Distributed) -> None:
    if context.active and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, context: Distributed, device: torch.device, sync_batchnorm: bool) -> torch.nn.Module:
    if not context.active:
        return model
    if sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sync_buffers(model: torch.nn.Module, context: Distributed) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DistributedDataParallel broadcasts buffers at the start of each forward, so after an epoch's last
    step every rank holds statistics updated from its own share; this makes them agree again.
    """
    if context.active:
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer.data, src=0)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in unwrap(model).state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
