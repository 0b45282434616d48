"""Stage 2: decide which rank reads which slice, in which streaming group, into which HF file.

The plan is a pure function of the checkpoint description, the family, the world size and
the options, so every rank computes the same plan without talking to the others.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import torch

from distconv.sources.checkpoint import Checkpoint, Chunk, Read, TensorInfo
from distconv.errors import DistconvError
from distconv.families import Family
from distconv.spec import ModelSpec

_STACKED = re.compile(r"^(?P<prefix>decoder\.layers\.)(?P<sub>[A-Za-z_].*)$")
_PER_LAYER = re.compile(r"^decoder\.layers\.(?P<layer>\d+)\.")
_MTP = re.compile(r"^mtp\.layers\.(?P<m>\d+)\.(?:transformer_layer\.)?(?P<sub>.+)$")
# grouped expert tensors carry an expert axis after the layer axis (SequentialMLP and GroupedMLP alike)
_GROUPED_EXPERTS = ".mlp.experts.experts."
# per-expert spellings of other versions and formats -> the canonical ``mlp.experts.{e}.``
_PER_EXPERT = (
    re.compile(r"\.mlp\.experts\.local_experts\.(?P<e>\d+)\.(?P<rest>.+)$"),  # SequentialMLP module keys
    re.compile(r"\.mlp\.experts\.experts\.(?P<e>\d+)\.(?P<rest>.+)$"),  # singleton local shards
    re.compile(r"\.mlp\.experts\.(?P<rest>[a-z_0-9]+\.(?:weight|bias))(?P<e>\d+)$"),  # TEGroupedMLP weight{e}
)


@dataclasses.dataclass(frozen=True)
class Item:
    """One logical Megatron tensor (one layer's slice of a stacked key): the unit of mapping."""

    name: str  # per-layer name the mappings use, e.g. decoder.layers.3.mlp.linear_fc2.weight
    key: str  # checkpoint key
    index: tuple[int, ...]  # leading indices into the stored tensor
    shape: tuple[int, ...]
    layer: int | None


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
        return sum(_numel(r.sizes) for r in group.reads) * self.dtype_of(group).itemsize

    def bytes_read_by(self, rank: int) -> int:
        return sum(_numel(r.sizes) * self.dtype_of(g).itemsize for g in self.groups for r in g.reads if r.rank == rank)

    def bytes_written_by(self, rank: int) -> int:
        return sum(g.nbytes for g in self.groups if g.writer == rank)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def numbered(indices: set[int], n: int) -> bool:
    """``indices`` are exactly ``0 .. n-1`` (layers or experts, none missing, none extra), checked
    without building ``range(n)``: ``n`` may be a hostile claim."""
    return len(indices) == n and (n == 0 or (min(indices) == 0 and max(indices) == n - 1))


def expert_name(name: str) -> str:
    """A per-expert tensor name in its canonical form ``...mlp.experts.{e}.linear_fc1.weight``."""
    for pattern in _PER_EXPERT:
        m = pattern.search(name)
        if m:
            return f"{name[: m.start()]}.mlp.experts.{m['e']}.{m['rest']}"
    return name


def mtp_as_layer(key: str, num_layers: int) -> str:
    """An MTP key under the engine's name for it: megatron-core's ``mtp.layers.{m}`` (its own tensors
    and its ``transformer_layer``'s) is named ``decoder.layers.{num_layers + m}``; other keys as they are."""
    m = _MTP.match(key)
    return f"decoder.layers.{num_layers + int(m['m'])}.{m['sub']}" if m else key


def items_of(tensor: TensorInfo, num_layers: int, num_experts: int | None = None) -> list[Item]:
    """Split a stored tensor into per-layer (and per-expert) items.

    Stacked ``decoder.layers.*`` keys have a leading layer axis; grouped expert keys
    (``mlp.experts.experts.*``) then an expert axis. Per-layer keys (``decoder.layers.{i}.*``,
    non-homogeneous models; MTP layers, see ``mtp_as_layer``) and per-expert keys keep their index
    in the name.
    """
    m = _STACKED.match(tensor.key)
    if m and tensor.shape and tensor.shape[0] == num_layers:
        layers = [((l,), f"{m['prefix']}{l}.{m['sub']}", l) for l in range(num_layers)]
        shape = tensor.shape[1:]
    else:
        name = mtp_as_layer(tensor.key, num_layers)
        per_layer = _PER_LAYER.match(name)
        layers = [((), name, int(per_layer["layer"]) if per_layer else None)]
        shape = tensor.shape
    items = []
    for index, name, layer in layers:
        head, grouped, tail = name.partition(_GROUPED_EXPERTS)
        if grouped and not tail[:1].isdigit() and num_experts and shape and shape[0] == num_experts:
            items += [
                Item(f"{head}.mlp.experts.{e}.{tail}", tensor.key, index + (e,), shape[1:], layer)
                for e in range(num_experts)
            ]
        else:
            items.append(Item(expert_name(name), tensor.key, index, shape, layer))
    return items


def _chunks_by_index(tensor: TensorInfo, lead: int) -> dict[tuple[int, ...], list[Chunk]]:
    """The chunks touching each leading index (layer, expert): items look up theirs, not scan all."""
    by_index: dict[tuple[int, ...], list[Chunk]] = {}
    for chunk in tensor.chunks:
        ranges = [range(o, o + s) for o, s in zip(chunk.offsets[:lead], chunk.sizes[:lead])]
        for index in itertools.product(*ranges):
            by_index.setdefault(index, []).append(chunk)
    return by_index


def _reads_for(item: Item, pos: int, tensor: TensorInfo, chunks: list[Chunk], world: int) -> list[Read]:
    """Intersect the item's box with the stored chunks; the chunk's writer rank reads it."""
    lead = len(item.index)
    box_off = item.index + (0,) * len(item.shape)
    box_size = (1,) * lead + item.shape
    reads = []
    for chunk in chunks:
        lo = tuple(max(a, b) for a, b in zip(box_off, chunk.offsets))
        hi = tuple(min(a + s, b + t) for a, s, b, t in zip(box_off, box_size, chunk.offsets, chunk.sizes))
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        sizes = tuple(h - l for l, h in zip(lo, hi))
        dest = tuple(slice(l, h) for l, h in zip(lo[lead:], hi[lead:]))
        reads.append(Read(pos, chunk.writer % world, tensor.key, tensor.shape, lo, sizes, dest))
    covered = sum(_numel(r.sizes) for r in reads)
    if covered != _numel(item.shape):
        raise DistconvError(f"checkpoint tensor {item.key} is incomplete: its stored chunks cover {covered} of {_numel(item.shape)} elements of {item.name}")
    return reads


def _order(item: Item) -> tuple[int, int, str]:
    if item.key.startswith("embedding."):
        return (0, 0, item.name)
    if item.layer is not None:
        return (1, item.layer, item.name)
    return (2, 0, item.name)


def _split(items: list[Item], window: int, itemsize: int) -> list[list[Item]]:
    """Cut a run of items into pieces of at most ``window`` bytes (an item is never cut)."""
    pieces: list[list[Item]] = [[]]
    size = 0
    for item in items:
        n = _numel(item.shape) * itemsize
        if pieces[-1] and size + n > window:
            pieces.append([])
            size = 0
        pieces[-1].append(item)
        size += n
    return pieces


def make_plan(
    ckpt: Checkpoint,
    spec: ModelSpec,
    family: Family,
    dtype: torch.dtype,
    world: int,
    *,
    max_shard_size: int,
    window: int = 1 << 30,
    writers: int = 1,
    fp8_rest: torch.dtype | None = None,
) -> Plan:
    """Items grouped per layer (split by ``window`` bytes), their reads, and the HF outputs.

    With ``writers`` > 1 the groups are cut into that many contiguous ranges of about equal
    bytes; each range is written by its own rank into its own files, and the ranges are
    interleaved in the processing order so that the writers work at the same time. ``dtype`` is
    the gathered dtype; with ``fp8_rest`` the family's quantized weights are planned as FP8 plus
    their float32 ``_scale_inv`` (quantized from ``dtype``) and every other output in ``fp8_rest``.
    Tensors a ``Rule.float32`` maps that the checkpoint stores float32 are read in float32, in groups
    of their own.
    """
    if not 1 <= writers <= world:
        raise DistconvError(f"--writers {writers} must be between 1 and the number of ranks ({world})")
    items = sorted(
        (i for t in ckpt.tensors.values() for i in items_of(t, spec.num_layers, spec.num_experts)), key=_order
    )
    by_unit: dict[tuple[int, int | str], list[Item]] = {}
    for item in items:
        unit = _order(item)
        by_unit.setdefault((unit[0], item.layer if item.layer is not None else item.name), []).append(item)

    groups: list[Group] = []
    named: list[list[tuple[str, torch.Tensor]]] = []
    indexes: dict[str, dict[tuple[int, ...], list[Chunk]]] = {}

    float32_rules = [r for r in family.rules if r.float32]

    def float32(item: Item) -> bool:
        return (dtype != torch.float32 and ckpt.tensors[item.key].dtype == torch.float32
                and any(r.match(item.name) is not None for r in float32_rules))

    for unit_items in by_unit.values():
        kept: list[Item] = []
        rest: list[Item] = []
        for item in unit_items:
            (kept if float32(item) else rest).append(item)
        for kind, run in ((torch.float32, kept), (None, rest)):
            for piece in _split(run, window, (kind or dtype).itemsize) if run else ():
                reads, outs = [], []
                for pos, item in enumerate(piece):
                    tensor = ckpt.tensors[item.key]
                    if item.key not in indexes:
                        indexes[item.key] = _chunks_by_index(tensor, len(item.index))
                    chunks = indexes[item.key].get(item.index, [])
                    reads += _reads_for(item, pos, tensor, chunks, world)
                    meta = torch.empty(item.shape, dtype=kind or dtype, device="meta")
                    outs += family.export_tensor(item.name, meta, spec, fp8_rest)
                groups.append(Group(piece, reads, dtype=kind))
                named.append(outs)

    ranges = _ranges([sum(t.numel() * t.element_size() for _, t in outs) for outs in named], writers)
    writer_ranks = [i * world // writers for i in range(writers)]
    outputs, files = _assign_files(named, ranges, max_shard_size)
    for group_outputs, group, r in zip(outputs, groups, [r for r, rng in enumerate(ranges) for _ in rng]):
        group.outputs, group.writer = group_outputs, writer_ranks[r]
    order = [g for batch in itertools.zip_longest(*ranges) for g in batch if g is not None]
    flat = [o for outs in outputs for o in outs]
    return Plan([groups[g] for g in order], flat, files, dtype, world, writer_ranks[: len(ranges)])


def _ranges(sizes: list[int], parts: int) -> list[range]:
    """Cut group indices into ``parts`` contiguous ranges of about equal total size."""
    total, bounds, acc = sum(sizes), [0], 0
    for i, n in enumerate(sizes):
        acc += n
        if len(bounds) < parts and acc >= total * len(bounds) / parts and i + 1 < len(sizes):
            bounds.append(i + 1)
    bounds.append(len(sizes))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _assign_files(
    named: list[list[tuple[str, torch.Tensor]]], ranges: list[range], max_shard_size: int
) -> tuple[list[list[Output]], list[str]]:
    """Fill safetensors files in order, each at most ``max_shard_size`` bytes (HF naming);
    a writer's range always starts a new file."""
    seen: set[str] = set()
    shard_of: list[list[int]] = []
    shard, size = -1, 0
    starts = {rng.start for rng in ranges}
    for g, outs in enumerate(named):
        if g in starts:
            shard, size = shard + 1, 0
        shard_of.append([])
        for name, t in outs:
            if name in seen:
                raise DistconvError(f"two checkpoint tensors map to the same HF tensor {name}")
            seen.add(name)
            n = t.numel() * t.element_size()
            if size and size + n > max_shard_size:
                shard, size = shard + 1, 0
            shard_of[-1].append(shard)
            size += n
    total = shard + 1
    files = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    outputs = [
        [Output(name, tuple(t.shape), t.dtype, files[s]) for (name, t), s in zip(outs, shards)]
        for outs, shards in zip(named, shard_of)
    ]
    return outputs, files
