"""The plan's vocabulary: which rank reads which box, in which streaming group, into which output.

A plan is a pure function of the source's description, the mapping, the world size and the
options, so every rank computes the same plan without talking to the others.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Item:
    """One logical Megatron tensor (one layer's slice of a stacked key): the unit of mapping."""

    name: str  # per-layer name the mappings use, e.g. decoder.layers.3.mlp.linear_fc2.weight
    key: str  # checkpoint key
    index: tuple[int, ...]  # leading indices into the stored tensor
    shape: tuple[int, ...]
    layer: int | None


@dataclasses.dataclass(frozen=True)
class Read:
    """A box of a stored tensor that one rank loads, and where it lands in its item."""

    item: int  # position in the group's items
    rank: int
    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dest: tuple[slice, ...]  # inside the item tensor


@dataclasses.dataclass(frozen=True)
class Output:
    """One HF tensor and the safetensors file it goes to."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclasses.dataclass
class Group:
    """What is read, gathered and written together; its writer holds one group at a time."""

    items: list[Item]
    reads: list[Read]
    outputs: list[Output] = dataclasses.field(default_factory=list)
    writer: int = 0  # the rank that gathers, maps and writes this group
    dtype: torch.dtype | None = None  # read and gathered in this dtype (None: the plan's)

    def reads_of(self, rank: int) -> list[Read]:
        return [r for r in self.reads if r.rank == rank]

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)


@dataclasses.dataclass
class Plan:
    groups: list[Group]  # in processing order (writers' ranges interleaved)
    outputs: list[Output]  # in model order
    files: list[str]
    dtype: torch.dtype
    world: int
    writers: list[int]  # ranks that write safetensors files

    def dtype_of(self, group: Group) -> torch.dtype:
        """The dtype ``group`` is read and gathered in."""
        return group.dtype or self.dtype

    def batches(self, limit: int) -> list[list[int]]:
        """Consecutive groups of one dtype read by one ``load`` call, at most ``limit`` bytes each."""
        out: list[list[int]] = [[]]
        size = 0
        for i, g in enumerate(self.groups):
            if out[-1] and (size + g.nbytes > limit or self.dtype_of(self.groups[out[-1][0]]) != self.dtype_of(g)):
                out.append([])
                size = 0
            out[-1].append(i)
            size += g.nbytes
        return out

    @property
    def total_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    @property
    def tensors(self) -> int:
        return len(self.outputs)

    def read_bytes(self, group: Group) -> int:
        """Bytes of ``group``'s reads (all ranks)."""
        return sum(numel(r.sizes) for r in group.reads) * self.dtype_of(group).itemsize

    def bytes_read_by(self, rank: int) -> int:
        return sum(numel(r.sizes) * self.dtype_of(g).itemsize for g in self.groups for r in g.reads if r.rank == rank)

    def bytes_written_by(self, rank: int) -> int:
        return sum(g.nbytes for g in self.groups if g.writer == rank)


def numel(shape: tuple[int, ...]) -> int:
    """The number of elements of a tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= s
    return n
