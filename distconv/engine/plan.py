"""The plan's vocabulary, the same for every direction: which rank reads which box, into which
unit, written by which rank into which output.

A ``Unit`` is what one writer produces in one step: its ``parts`` (the tensors it assembles
from its reads: an export's per-layer Megatron tensors, an import's or reshard's one target
chunk), the ``reads`` that fill them (each by the rank that reads it), and the ``outputs`` the
writer's sink receives (HF tensors in safetensors files, or checkpoint chunks). A unit whose
reads all lie on its writer needs no gather. A ``Plan`` is the units in processing order; it
is a pure function of the source's description, the mapping, the world size and the options,
so every rank computes the same plan without talking to the others.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from distconv.errors import DistconvError

def numel(shape: tuple[int, ...]) -> int:
    """The number of elements of a tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= s
    return n


@dataclasses.dataclass(frozen=True)
class Part:
    """One tensor a unit assembles from its reads: one layer's (and expert's) slice ``index`` of the
    stored tensor ``key`` (``layer`` None for a model tensor), or a whole target chunk."""

    name: str  # the name the mapping uses, e.g. decoder.layers.3.mlp.linear_fc2.weight
    key: str  # the stored (or target) tensor's key
    index: tuple[int, ...]  # leading indices into the stored tensor
    shape: tuple[int, ...]
    layer: int | None = None


@dataclasses.dataclass(frozen=True)
class Read:
    """A box of a source tensor that one rank reads, and where it lands in its unit's part."""

    part: int  # position in the unit's parts
    rank: int
    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dest: tuple[slice, ...]  # inside the part
    nbytes: int  # what reading it costs the source (its stored dtype; an HF-named source's rows)


@dataclasses.dataclass(frozen=True)
class Slab:
    """Piece ``index`` of ``count`` equal pieces of one tensor, stacked along its first axis (an HF
    tensor holding every expert of a layer). A tensor's slabs are planned in order into one file;
    a sink stores them together (``file_order``, ``whole``)."""

    index: int
    count: int


@dataclasses.dataclass(frozen=True)
class Output:
    """One tensor a sink writes: its name, shape and dtype, the file it goes to, and where in the
    tensor it lies: a ``Slab`` of it (an HF tensor stacked over experts), or for a checkpoint chunk
    the sink's own description."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    place: Any = None

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * self.dtype.itemsize


def whole(outputs: list[Output]) -> dict[str, tuple[tuple[int, ...], torch.dtype, str]]:
    """The tensors ``outputs`` make, in order of first appearance: name -> (shape, dtype, file), a
    tensor's slabs joined. A tensor planned twice, or slabs that miss one, repeat one or differ in
    shape, dtype or file, are an (internal) error."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype, str]] = {}
    slabs: dict[str, list[Output]] = {}
    for o in outputs:
        slab = o.place if isinstance(o.place, Slab) else None
        if slab is not None and o.name in slabs:
            slabs[o.name].append(o)
            continue
        if o.name in out:
            raise DistconvError(f"internal: the plan writes {o.name} twice")
        out[o.name] = ((slab.count, *o.shape) if slab else o.shape, o.dtype, o.file)
        if slab is not None:
            slabs[o.name] = [o]
    for name, pieces in slabs.items():
        first = pieces[0]
        if (sorted(p.place.index for p in pieces) != list(range(first.place.count))
                or any((p.shape, p.dtype, p.file, p.place.count) != (first.shape, first.dtype, first.file, first.place.count)
                       for p in pieces)):
            raise DistconvError(f"internal: the slabs of {name} are not {first.place.count} alike in one file")
    return out


def file_order(outputs: list[Output]) -> list[Output]:
    """``outputs`` in the order a file stores them: each tensor's slabs together, by index, where
    its first one is (MXFP4's blocks and scales arrive together one expert at a time, yet each is
    one tensor of every expert's slabs)."""
    first: dict[str, int] = {}
    for i, o in enumerate(outputs):
        first.setdefault(o.name, i)
    return sorted(outputs, key=lambda o: (first[o.name], o.place.index if isinstance(o.place, Slab) else 0))


@dataclasses.dataclass
class Unit:
    """What one writer produces in one step; its writer holds one unit's parts at a time."""

    parts: list[Part]
    reads: list[Read]
    outputs: list[Output] = dataclasses.field(default_factory=list)
    writer: int = 0  # the rank that assembles (gathers), maps and writes this unit
    dtype: torch.dtype | None = None  # read in this dtype (None: the plan's)

    def reads_of(self, rank: int) -> list[Read]:
        return [r for r in self.reads if r.rank == rank]

    @property
    def gathered(self) -> bool:
        """Whether some of its reads lie on other ranks than its writer."""
        return any(r.rank != self.writer for r in self.reads)

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)


@dataclasses.dataclass
class Plan:
    units: list[Unit]  # in processing order (writers' ranges interleaved)
    outputs: list[Output]  # in model order
    files: list[str]  # the files the sink writes tensors into (and the checkpoint's metadata files)
    dtype: torch.dtype
    world: int
    writers: list[int]  # ranks that write

    def dtype_of(self, unit: Unit) -> torch.dtype:
        """The dtype ``unit`` is read in."""
        return unit.dtype or self.dtype

    def batches(self, limit: int) -> list[list[int]]:
        """Consecutive units of one dtype read by one ``load`` call, at most ``limit`` bytes each."""
        out: list[list[int]] = [[]]
        size = 0
        for i, u in enumerate(self.units):
            if out[-1] and (size + u.nbytes > limit or self.dtype_of(self.units[out[-1][0]]) != self.dtype_of(u)):
                out.append([])
                size = 0
            out[-1].append(i)
            size += u.nbytes
        return out

    @property
    def total_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    @property
    def tensors(self) -> int:
        """The tensors (or checkpoint chunks) written; an HF tensor's slabs count once."""
        return sum(not isinstance(o.place, Slab) or o.place.index == 0 for o in self.outputs)

    def read_bytes(self, unit: Unit) -> int:
        """Bytes of ``unit``'s reads (all ranks)."""
        return sum(r.nbytes for r in unit.reads)

    def bytes_read_by(self, rank: int) -> int:
        return sum(r.nbytes for u in self.units for r in u.reads if r.rank == rank)

    @property
    def gathered_bytes(self) -> int:
        """Bytes of the reads made on other ranks than their unit's writer (at the source's cost)."""
        return sum(r.nbytes for u in self.units for r in u.reads if r.rank != u.writer)

    def bytes_written_by(self, rank: int) -> int:
        return sum(u.nbytes for u in self.units if u.writer == rank)


def most_held(reads: list[Read], world: int) -> int:
    """The rank whose ``reads`` hold most bytes (the lowest of a tie): the one that can hand their
    tensors out with the least gathered from others."""
    held = [0] * world
    for read in reads:
        held[read.rank] += read.nbytes
    return held.index(max(held))


def numbered(indices: set[int], n: int) -> bool:
    """``indices`` are exactly ``0 .. n-1`` (layers or experts, none missing, none extra), checked
    without building ``range(n)``: ``n`` may be a hostile claim."""
    return len(indices) == n and (n == 0 or (min(indices) == 0 and max(indices) == n - 1))
