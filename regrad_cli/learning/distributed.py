"""Data-parallel meta-training under ``torchrun``: which process am I, and the few collectives
the recipe needs.

torchrun starts one process per device and sets WORLD_SIZE, RANK and LOCAL_RANK. Every process
draws the same global meta-batch and works on its own contiguous shard; its loss carries the
shard's share of the batch (``metatrain.outer_loss``), so summing the gradients over processes
gives exactly the gradient of the whole batch. Every process then clips and steps identically and
the parameters never diverge. Without those variables, or with WORLD_SIZE=1, nothing here touches
torch.distributed: ``SINGLE`` answers every call locally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch

from regrad_cli.errors import RegradError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (world 1 = the plain single-process run)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes files, logs and draws progress."""
        return self.rank == 0

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """This rank's contiguous shard [lo, hi) of n items; sizes differ by at most one."""
        r = self.rank if rank is None else rank
        return r * n // self.world, (r + 1) * n // self.world

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; returns t."""
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t

    def sum_grads(self, params: Iterable[torch.Tensor]) -> None:
        """Sum the gradients over processes, in one flat message.

        Parameters without a gradient stay without one (AdamW skips them; a zero would not be
        the same step). Every rank runs the same graph, so the set is the same everywhere."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite the tensors with rank 0's values."""
        if self.enabled:
            with torch.no_grad():
                for t in tensors:
                    torch.distributed.broadcast(t.data, src=0)

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.enabled:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def check_in_sync(self, tensors: Iterable[torch.Tensor], what: str = "parameters") -> None:
        """Raise if the processes hold different values (a cheap checksum, two all-reduces)."""
        if not self.enabled:
            return
        tensors = list(tensors)
        # Sum and a position-weighted sum: a swap of two values changes the second.
        sums = torch.zeros(2, dtype=torch.float64, device=tensors[0].device)
        for t in tensors:
            v = t.detach().reshape(-1).double()
            sums[0] += v.sum()
            sums[1] += (v * torch.arange(1, v.numel() + 1, device=v.device, dtype=v.dtype)).sum()
        hi, lo = sums.clone(), -sums
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MAX)
        if not torch.equal(hi, -lo):
            raise RegradError(f"the {what} differ between the {self.world} processes (checksums "
                              f"{(-lo).tolist()} .. {hi.tolist()}): the run is not data-parallel any more")

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


SINGLE = Dist()


def from_env() -> Dist:
    """What torchrun says about this process (world 1 when not launched by it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise RegradError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers: {exc}") from exc
    if world < 1 or not 0 <= rank < world:
        raise RegradError(f"RANK {rank} is not in a world of WORLD_SIZE {world}")
    return Dist(world, rank, local_rank)


def init(device: str) -> tuple[Dist, str]:
    """Join the torchrun job, if any; returns this process's Dist and the device it should use.

    With CUDA each process takes the GPU of its LOCAL_RANK and the NCCL backend; on CPU, gloo."""
    d = from_env()
    if not d.enabled:
        return SINGLE, device
    if not torch.distributed.is_available():
        raise RegradError("this PyTorch build has no torch.distributed; run meta-train without torchrun")
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise RegradError(f"device {device!r} requested but CUDA is not available")
        if d.local_rank >= torch.cuda.device_count():
            raise RegradError(f"LOCAL_RANK {d.local_rank} but only {torch.cuda.device_count()} GPUs are "
                              "visible: start at most one process per GPU (--nproc-per-node)")
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(d.local_rank)
    if not torch.distributed.is_initialized():
        if cuda:
            # Binding the GPU up front: NCCL's barrier would otherwise guess the device.
            torch.distributed.init_process_group(backend="nccl", device_id=torch.device(device))
        else:
            torch.distributed.init_process_group(backend="gloo")
    return d, device


def current() -> Dist:
    """The job this process has joined (``SINGLE`` when torch.distributed is not initialised)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return SINGLE
    world = torch.distributed.get_world_size()
    if world == 1:
        return SINGLE
    rank = torch.distributed.get_rank()
    return Dist(world, rank, int(os.environ.get("LOCAL_RANK", str(rank))))


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

