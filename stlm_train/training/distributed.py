"""Process-group set-up for torchrun (DDP) and device resolution; one process is the common case."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .options import TrainError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> DistInfo:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; with WORLD_SIZE > 1 join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=2))
        here = True
    if device_type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistInfo(rank, world, local, here)


def resolve_device(spec: str, info: DistInfo | None = None) -> torch.device:
    s = str(spec).strip().lower()
    if s == "cpu":
        return torch.device("cpu")
    if s == "cuda" or s.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise TrainError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        if info is not None and info.world_size > 1:
            return torch.device("cuda", info.local_rank)
        return torch.device(s)
    raise TrainError(f"--device must be cpu, cuda or cuda:N, got {spec!r}")


def all_ranks_max(value: float, info: DistInfo, device: torch.device) -> float:
    """The largest ``value`` over all ranks (ranks must agree on when to stop, or one waits forever)."""
    if info.world_size <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def all_ranks_all(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True only if ``flag`` is true on every rank (one all-reduce; every rank gets the same answer)."""
    if info.world_size <= 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
