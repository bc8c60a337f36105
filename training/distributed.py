"""Distributed data-parallel training: one command from one process to many.

`rnnserve train lm ...` runs in one process; the same command under torchrun runs data-parallel:

    torchrun --standalone --nproc-per-node 2 -m rnnserve train lm --out runs/ddp ...

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; we then join a process group (gloo on CPU, NCCL on CUDA,
one GPU per process), wrap the model in DistributedDataParallel, and give every rank its share of the
`batch_size` parallel streams, so the global batch (and hence the optimisation) is the same whatever the
number of processes. Only rank 0 writes files and prints; the other ranks compute and keep in step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, metrics and the progress bar."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun); needs no process group."""
    return _env_int("RANK", 0)


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job described by the environment, if any; returns (info, this rank's device).

    Without torchrun's WORLD_SIZE (or with 1) nothing happens. On CUDA each process takes the GPU of its
    LOCAL_RANK and the NCCL backend; on CPU the gloo backend.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo(), device
    info = DistInfo(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # How long connecting and each collective may take before the rank fails (PyTorch's default, 30
        # min, unless RNNSERVE_DIST_TIMEOUT_S says otherwise): a rank that fails is restarted by torchrun
        # (--max-restarts), where a rank stuck connecting would hang the job.
        timeout = timedelta(seconds=_env_int("RNNSERVE_DIST_TIMEOUT_S", 1800))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        # Creating the group is not a synchronisation point: a rank racing ahead into its first collective
        # while a peer still connects can abort gloo (pytorch/pytorch#61396). Meet here first.
        dist.barrier()
    return info, device


def wait_for_all_ranks(info: DistInfo) -> None:
    """A barrier before leaving the job: tearing gloo down while another rank still talks to this one
    aborts the process ("terminate called without an active exception")."""
    if info.enabled and dist.is_initialized():
        dist.barrier()


def shutdown_distributed(info: DistInfo) -> None:
    """Leave the process group (a no-op when not distributed)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard_rows(data: Tensor, info: DistInfo, dim: int = 0) -> Tensor:
    """This rank's contiguous block of the parallel streams along `dim` (the batch axis): e.g. tokens
    (batch, time) -> (batch / world, time), or a state (layers, batch, hidden) with dim=1."""
    batch = data.shape[dim]
    if batch % info.world_size:
        raise ValueError(
            f"batch_size {batch} must be divisible by the number of processes ({info.world_size})"
        )
    rows = batch // info.world_size
    return data.narrow(dim, info.rank * rows, rows)


def any_rank(flags: tuple[bool, ...], info: DistInfo, device: torch.device) -> tuple[bool, ...]:
    """Each flag, true on every rank if it is true on any (so all ranks stop at the same step and never
    deadlock); one all-reduce for all of them."""
    if not info.enabled:
        return flags
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v > 0) for v in t.tolist())


def sum_across_ranks(values: tuple[float, int], info: DistInfo, device: torch.device) -> tuple[float, int]:
    """(a float sum, a count) summed over all ranks; unchanged when not distributed."""
    if not info.enabled:
        return values
    t = torch.tensor([float(values[0]), float(values[1])], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0].item()), int(t[1].item())


def gather_to_main(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere); [obj] when not distributed."""
    if not info.enabled:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` when distributed (it broadcasts rank 0's initial weights
    and averages gradients across ranks in backward); the model itself otherwise."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
