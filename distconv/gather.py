"""Stage 4: the process group, error agreement, and gathering each group's slices on rank 0.

NCCL carries tensors when CUDA is available (``--device auto``), gloo otherwise. Control
messages (error agreement) always go over a gloo group so they never need a GPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from distconv.errors import DistconvError
from distconv.plan import Group

_ALIGN = 16


@dataclasses.dataclass
class Comm:
    """This process's place in the run, and the groups it talks over."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool
    control: dist.ProcessGroup | None

    @classmethod
    def setup(cls, device: str = "auto", timeout_s: float = 1800.0) -> "Comm":
        """Reuse an existing default group (post-training hook), else create one.

        Under torchrun/Slurm the environment names rank and world; a plain process runs as a
        group of one (megatron-core's ``load`` needs a process group even then).
        """
        want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if device == "cuda" and not torch.cuda.is_available():
            raise DistconvError("--device cuda was asked for but CUDA is not available")
        owns = not dist.is_initialized()
        timeout = datetime.timedelta(seconds=timeout_s)
        if want_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if owns:
            backend = "cpu:gloo,cuda:nccl" if want_cuda else "gloo"
            if "WORLD_SIZE" in os.environ:
                dist.init_process_group(backend, timeout=timeout)
            else:
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        world = dist.get_world_size()
        use_cuda = want_cuda and "nccl" in str(dist.get_backend()).lower()
        control = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None
        dev = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        return cls(dist.get_rank(), world, dev, owns, control)

    def close(self) -> None:
        if self.control is not None:
            dist.destroy_process_group(self.control)
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def agree(self, error: BaseException | None) -> None:
        """Collective: if any rank failed, every rank raises ``DistconvError`` with one message.

        The message is rank 0's own when it failed, else the first failing rank's.
        """
        if self.world == 1:
            if error is not None:
                raise _as_user_error(error)
            return
        flag = torch.tensor([0 if error is None else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        if not flag.item():
            return
        messages: list[str | None] = [None] * self.world
        dist.all_gather_object(messages, None if error is None else str(_as_user_error(error)), group=self.control)
        rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
        raise DistconvError(message if rank == 0 else f"{message} (on rank {rank})") from error

    def gather(self, group: Group, mine: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor] | None:
        """Assemble the group's items on rank 0 from every rank's slices (None elsewhere)."""
        if self.rank != 0:
            if mine:
                dist.send(_pack(mine, self.device), dst=0)
            return None
        full = [torch.empty(item.shape, dtype=dtype) for item in group.items]
        for read, t in zip(group.reads_of(0), mine):
            full[read.item][read.dest] = t.reshape(full[read.item][read.dest].shape)
        pending = []
        for src in range(1, self.world):
            reads = group.reads_of(src)
            if reads:
                buf = torch.empty(_packed_size(reads, dtype), dtype=torch.uint8, device=self.device)
                pending.append((reads, buf, dist.irecv(buf, src=src)))
        for reads, buf, work in pending:
            work.wait()
            host = buf.cpu()
            for read, t in zip(reads, _unpack(host, reads, dtype)):
                full[read.item][read.dest] = t.reshape(full[read.item][read.dest].shape)
        return full


def _as_user_error(error: BaseException) -> DistconvError:
    if isinstance(error, DistconvError):
        return error
    if isinstance(error, OSError):
        return DistconvError(f"{error.strerror or error}{f': {error.filename}' if error.filename else ''}")
    return DistconvError(f"{type(error).__name__}: {error}")


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _packed_size(reads, dtype: torch.dtype) -> int:
    total = 0
    for r in reads:
        n = dtype.itemsize
        for s in r.sizes:
            n *= s
        total += _aligned(n)
    return total


def _pack(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One contiguous byte buffer holding every tensor, each at an aligned offset."""
    sizes = [_aligned(t.numel() * t.element_size()) for t in tensors]
    buf = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    offset = 0
    for t, size in zip(tensors, sizes):
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        buf[offset : offset + raw.numel()].copy_(raw, non_blocking=True)
        offset += size
    return buf


def _unpack(buf: torch.Tensor, reads, dtype: torch.dtype) -> list[torch.Tensor]:
    out, offset = [], 0
    for r in reads:
        n = dtype.itemsize
        for s in r.sizes:
            n *= s
        out.append(buf[offset : offset + n].view(dtype).reshape(r.sizes))
        offset += _aligned(n)
    return out
