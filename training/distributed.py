"""Multi-process training through `torchrun` (DistributedDataParallel); one code path for 1..N processes."""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from errors import UserError


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, number of processes, local rank and whether it set up a group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        """True on the process that writes checkpoints, logs and figures."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from None


def setup(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK (NCCL on CUDA, gloo on CPU)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size <= 1:
        return DistInfo()
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world_size, local_rank, True)


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """The device this process trains on: cuda:LOCAL_RANK on GPU machines, else the given device."""
    if device.type == "cuda" and info.world_size > 1:
        return torch.device("cuda", info.local_rank)
    return device


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op in a single process)."""
    if info.world_size > 1:
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every process if `flag` is true on any of them (used to stop all ranks together)."""
    if info.world_size <= 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over processes (a copy; the input is left alone)."""
    if info.world_size <= 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def cleanup(info: DistInfo) -> None:
    """Leave the process group if `setup` created it."""
    if info.initialized and dist.is_initialized():
        dist.destroy_process_group()


def current_info() -> DistInfo:
    """Where this process sits in an already joined process group (a single process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), False)
    return DistInfo()


def my_share(count: int, info: DistInfo) -> list[int]:
    """Indices 0..count-1 of the work items (batches) this process handles: every world_size-th from its rank."""
    return list(range(info.rank, int(count), info.world_size))


def batch_seed(seed: int, index: int) -> int:
    """Seed of work item `index`: `seed` itself for the first, a hashed (seed, index) for the others.

    Seeding each batch on its own makes sampling and likelihood results independent of how many processes
    share the batches (the first batch is drawn exactly as a single-batch run always drew it).
    """
    if index == 0:
        return int(seed)
    from data.loaders import stream_seed

    return stream_seed(int(seed), int(index), 0, 0xBA7C)


def gather_indexed(local: dict, info: DistInfo) -> list:
    """Every process's {index: value} merged, as a list in index order (all_gather of picklable values)."""
    if info.world_size > 1:
        parts: list = [None] * info.world_size
        dist.all_gather_object(parts, local)
        local = {k: v for part in parts for k, v in part.items()}
    return [local[k] for k in sorted(local)]
