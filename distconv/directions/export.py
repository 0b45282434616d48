"""Export: a Megatron checkpoint (torch_dist or legacy) into an HF folder, as one ``Job`` of the engine.

The plan's units are a layer's tensors (cut at ``--window`` bytes), read by the ranks that saved
them (megatron-core's collective load; legacy rank files locally), gathered on the unit's
writer (NCCL on GPUs, else gloo), mapped by the family table and written behind into
safetensors shards (``engine.stream``).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from distconv.directions.hf_model import hf_tensors
from distconv.engine import marker
from distconv.engine.comm import Comm
from distconv.engine.folder import files_in, refuse_overlap
from distconv.engine.plan import Output, Part, Plan, Read, Slab, Unit, most_held, numbered, numel, whole
from distconv.engine.progress import Tracker
from distconv.engine.run import RunOptions, launch, parse_size
from distconv.engine.stream import Stream, WriterThread
from distconv.errors import DistconvError, warn
from distconv.families import FAMILIES, HUB_TYPES, Family, pick_family
from distconv.hf import mxfp4
from distconv.hf.fp8 import FP8, SCALE, quantization_config, scale_shape
from distconv.hf.sink import (
    ShardWriter,
    TorchFileWriter,
    complete,
    write_config,
    write_generation_config,
    write_index,
    write_tokenizer,
)
from distconv.hf.source import read_config
from distconv.hf.tokenizer import cached_hub_tokenizer, load_tokenizer
from distconv.megatron.args import arg, parallel_sizes, spec_from_args
from distconv.megatron.catalogue import canonical, items_of, split_expert, split_name
from distconv.megatron.checkpoint import Checkpoint, Chunk, TensorInfo, overlaps
from distconv.megatron.source import describe, open_reader, read_files
from distconv.megatron.tokenizer import (
    HF_TYPES,
    checkpoint_tokenizer,
    megatron_vocab,
    outside_checkpoint,
    saved_hf_tokenizer,
    special_tokens,
)
from distconv.spec import DTYPES, ModelSpec

FORMATS = ("safetensors", "torch")
READ_AT = ("saver", "writer")  # which rank reads a stored chunk: make_plan's read_at


def _load_hf_config(path: str | Path | None) -> tuple[Any, Path | None, list[str]]:
    """``--hf-config`` (a folder or a ``config.json``): the config, its folder, and warnings
    (``hf.source.read_config``: an ``auto_map`` is ignored and not written into the export)."""
    if path is None:
        return None, None, []
    path = Path(path)
    config, warnings = read_config(path, "--hf-config", HUB_TYPES)
    return config, path if path.is_dir() else path.parent, warnings


def tokenizer_folder(explicit: str | Path | None, ckpt: Checkpoint) -> tuple[Path | None, str, list[str]]:
    """The HF tokenizer folder an export reads, where it came from, and warnings: ``--tokenizer``, else
    the one saved inside the checkpoint (``tokenizer/``, when args' ``tokenizer_type`` is an HF one),
    else args' ``tokenizer_model``: a local folder, or a hub id whose snapshot is in the local HF cache
    (looked up offline, never downloaded), with a warning naming it when it lies outside the checkpoint.
    None when there is none (args' value is not looked at otherwise: a hub id not in the cache, a
    SentencePiece or tiktoken file)."""
    args, saved = ckpt.args, checkpoint_tokenizer(Path(ckpt.path))
    if explicit is not None:
        if not Path(explicit).is_dir():
            raise DistconvError(f"--tokenizer {explicit} is not a folder holding an HF tokenizer")
        return Path(explicit), "--tokenizer", []
    if saved_hf_tokenizer(args, saved):
        return saved, "the checkpoint's tokenizer", []
    candidate = arg(args, "tokenizer_model")
    origin = "args.tokenizer_model"
    folder = Path(candidate) if candidate is not None and Path(candidate).is_dir() else None
    if folder is None and candidate is not None and arg(args, "tokenizer_type") in HF_TYPES:
        folder = cached_hub_tokenizer(str(candidate))
        origin = f"args.tokenizer_model {candidate} (HF cache)"
    if folder is None:
        return None, "", []
    return folder, origin, [_outside(f"{origin} {folder}")] if outside_checkpoint(folder, Path(ckpt.path)) else []


def _load_tokenizer(explicit: str | Path | None, ckpt: Checkpoint) -> tuple[Any, str | None, list[str]]:
    """The HF tokenizer to export (``tokenizer_folder``'s), its folder, and warnings; one also says when
    the folder's ``auto_map`` was ignored (it is not written into the export). A folder that does not
    load as an HF tokenizer is an error naming it and the reason."""
    folder, origin, warnings = tokenizer_folder(explicit, ckpt)
    if folder is None:
        return None, None, []
    tokenizer, ignored = load_tokenizer(folder, origin)
    return tokenizer, str(folder), warnings + ignored


def _outside(what: str) -> str:
    """The warning for a tokenizer file read from outside the checkpoint (where args name it)."""
    return (f"{what} lies outside the checkpoint, which holds no tokenizer of its own: it was read from there; "
            "make sure it is the one the model was trained with (or pass --tokenizer)")


_NO_VOCAB = ("no true vocab size was found (no --vocab-size, no --hf-config, no tokenizer Megatron-LM's args name "
             "that is readable here, no args.vocab_size): the export keeps all {padded} padded rows; give --vocab-size N "
             "(or --hf-config with vocab_size, or --tokenizer) to trim them")


def _true_vocab(spec: ModelSpec, config: Any, tokenizer: Any, ckpt: Checkpoint,
                vocab_size: int | None = None) -> tuple[int, str, str | None, Path | None]:
    """The vocab size without Megatron's padding, where it came from, a warning (when nothing told it,
    or a file outside the checkpoint did), and the tokenizer file read for it.

    ``--vocab-size`` first (it must agree with ``--hf-config``), then ``--hf-config``, the HF
    tokenizer, the size Megatron-LM's tokenizer of args' ``tokenizer_type`` has (from the files
    saved in the checkpoint, else those args name), ``args.vocab_size``.
    """
    args = ckpt.args
    if vocab_size is not None:
        if int(vocab_size) <= 0:
            raise DistconvError(f"--vocab-size {vocab_size}: give a positive size")
        if config is not None and int(config.vocab_size) != int(vocab_size):
            raise DistconvError(f"--vocab-size {vocab_size} contradicts --hf-config vocab_size {config.vocab_size}")
        return int(vocab_size), "--vocab-size", None, None
    if config is not None:
        return int(config.vocab_size), "--hf-config vocab_size", None, None
    if tokenizer is not None:
        return len(tokenizer), "the tokenizer's size", None, None
    saved = checkpoint_tokenizer(Path(ckpt.path)) if ckpt.path is not None else None  # a live model: no folder
    if (found := megatron_vocab(args, saved)) is not None:
        size, source, read = found
        outside = read is not None and ckpt.path is not None and outside_checkpoint(read, Path(ckpt.path))
        return size, source, _outside(source) if outside else None, read
    if arg(args, "vocab_size") is not None:
        return int(args.vocab_size), "args.vocab_size", None, None
    return (spec.padded_vocab_size, "nothing (no --vocab-size, --hf-config, tokenizer or args.vocab_size): padded size kept",
            _NO_VOCAB.format(padded=spec.padded_vocab_size), None)


_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def _check_counts(plan: Plan, spec: ModelSpec, ckpt: Checkpoint) -> None:
    """The layers (MTP layers included) and experts the checkpoint stores are the args', before the
    HF model of the args is built to check the outputs against (on the meta device its modules still
    cost memory and time, per layer and per expert)."""
    parts = [p for u in plan.units for p in u.parts]
    layers = {p.layer for p in parts if p.layer is not None}
    experts = {int(m.group(1)) for p in parts if (m := _EXPERT.search(p.name))}
    for kind, stored, said in (("layers", layers, spec.num_layers + spec.mtp_num_layers),
                               ("experts", experts, spec.num_experts or 0)):
        if not numbered(stored, said):
            held = f"{len(stored)} (numbered {min(stored)} to {max(stored)})" if stored else "none"
            raise DistconvError(f"{ckpt.path}: the checkpoint's args say {said} {kind}, but it stores {held}")


def _check_against_hf(plan: Plan, config: Any, family: Family, spec: ModelSpec) -> None:
    """The outputs must be exactly the HF model's state dict: no tensor missing, none extra."""
    expected = hf_tensors(config, family, spec)
    produced = {name: shape for name, (shape, _, _) in whole(plan.outputs).items() if not name.endswith(SCALE)}
    for name, shape in list(expected.items()):  # MXFP4: the weight [..., in, out] as blocks and scales of [..., out, in]
        if name + mxfp4.BLOCKS in produced:
            del expected[name]
            expected[name + mxfp4.BLOCKS], expected[name + mxfp4.SCALES] = mxfp4.shapes((*shape[:-2], shape[-1], shape[-2]))
    _check_scales(plan)
    missing = sorted(set(expected) - set(produced))
    extra = sorted(set(produced) - set(expected))
    wrong = sorted(n for n in set(expected) & set(produced) if expected[n] != produced[n])
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"not used by {config.architectures[0]}: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
    if wrong:
        problems.append("shape mismatch: " + ", ".join(f"{n} {produced[n]} vs HF {expected[n]}" for n in wrong[:8]))
    if problems:
        raise DistconvError("the mapped tensors do not match the HF model: " + "; ".join(problems))


def _check_scales(plan: Plan) -> None:
    """Every FP8 output is followed by its float32 ``_scale_inv`` of the block layout, and every
    scale belongs to the FP8 weight before it (transformers loads them as ``weight_scale_inv``)."""
    outs = plan.outputs
    for i, o in enumerate(outs):
        if o.dtype == FP8:
            s = outs[i + 1] if i + 1 < len(outs) else None
            if s is None or s.name != o.name + SCALE or s.dtype != torch.float32 or s.shape != scale_shape(o.shape):
                raise DistconvError(f"internal: FP8 output {o.name} {o.shape} lacks its {SCALE} of shape {scale_shape(o.shape)}")
        elif o.name.endswith(SCALE) and (i == 0 or outs[i - 1].dtype != FP8):
            raise DistconvError(f"internal: {o.name} scales no FP8 weight")


def _chunks_by_index(tensor: TensorInfo, lead: int) -> dict[tuple[int, ...], list[Chunk]]:
    """The chunks touching each leading index (layer, expert): items look up theirs, not scan all."""
    by_index: dict[tuple[int, ...], list[Chunk]] = {}
    for chunk in tensor.chunks:
        ranges = [range(o, o + s) for o, s in zip(chunk.offsets[:lead], chunk.sizes[:lead])]
        for index in itertools.product(*ranges):
            by_index.setdefault(index, []).append(chunk)
    return by_index


def _reads_for(item: Part, pos: int, tensor: TensorInfo, chunks: list[Chunk], world: int, itemsize: int) -> list[Read]:
    """Intersect the item's box with the stored chunks; the chunk's writer rank reads it. Where one
    rank reads every piece (one rank, or a tensor its writer saved whole), the item is one read of
    its whole box: the reader puts each stored chunk straight into its place in the part, not into
    a tensor of its own that is then copied there."""
    lead = len(item.index)
    offsets = item.index + (0,) * len(item.shape)
    box = Read(pos, 0, tensor.key, tensor.shape, offsets, (1,) * lead + item.shape, (), 0)
    reads = []
    for chunk, _, dest in overlaps(box, tuple(chunks)):
        lo = tuple(o + d.start for o, d in zip(offsets, dest))
        sizes = tuple(d.stop - d.start for d in dest)
        reads.append(Read(pos, chunk.writer % world, tensor.key, tensor.shape, lo, sizes, dest[lead:], numel(sizes) * itemsize))
    covered = sum(numel(r.sizes) for r in reads)
    if covered != numel(item.shape):
        raise DistconvError(f"checkpoint tensor {item.key} is incomplete: its stored chunks cover {covered} of {numel(item.shape)} elements of {item.name}")
    if len(reads) > 1 and len({r.rank for r in reads}) == 1:
        return [_whole_read(item, reads, reads[0].rank)]
    return reads


def _whole_read(item: Part, reads: list[Read], rank: int) -> Read:
    """``item``'s ``reads`` (covering it) as one read of its whole box by ``rank``."""
    lead = len(item.index)
    return Read(reads[0].part, rank, item.key, reads[0].global_shape, item.index + (0,) * len(item.shape),
                (1,) * lead + item.shape, tuple(slice(0, s) for s in item.shape), sum(r.nbytes for r in reads))


def _order(item: Part) -> tuple[int, int, str, int]:
    """Embedding, layers (a routed expert's tensors by name, then by expert number: a tensor of
    every expert's slabs is written in one run), the rest."""
    if item.key.startswith("embedding."):
        return (0, 0, item.name, 0)
    if item.layer is not None:
        _, sub = split_name(item.name)
        expert, rest = split_expert(sub)
        return (1, item.layer, sub if expert is None else f"mlp.experts.{rest}", -1 if expert is None else expert)
    return (2, 0, item.name, 0)


def _split(items: list[Part], window: int, itemsize: int, family: Family,
           holder: Callable[[list[Part]], int] | None = None) -> list[list[Part]]:
    """Cut a run of items into pieces of at most ``window`` bytes (an item is never cut, nor are the
    items a family maps together: ``Family.group_of``); with ``holder``, also between two such
    groups held by different ranks (``holder(group)``)."""
    groups: dict[str, list[Part]] = {}
    for item in items:
        groups.setdefault(family.group_of(item.name), []).append(item)
    pieces: list[list[Part]] = [[]]
    size = 0
    owner = None  # the holder of the piece's groups
    for group in groups.values():
        n = sum(numel(item.shape) for item in group) * itemsize
        rank = holder(group) if holder is not None else None
        if pieces[-1] and (size + n > window or rank != owner):
            pieces.append([])
            size = 0
        pieces[-1] += group
        size += n
        owner = rank
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
    mxfp4_rest: torch.dtype | None = None,
    cut_at_holders: bool = False,
    read_at: str = "saver",
) -> Plan:
    """Units of a layer's items (split by ``window`` bytes), their reads, and the HF outputs.

    With ``writers`` > 1 the units are cut into that many contiguous ranges of about equal
    bytes; each range is written by its own rank into its own files, and the ranges are
    interleaved in the processing order so that the writers work at the same time. ``dtype`` is
    the gathered dtype; with ``fp8_rest`` the family's quantized weights are planned as FP8 plus
    their float32 ``_scale_inv`` (quantized from ``dtype``) and every other output in ``fp8_rest``;
    ``mxfp4_rest`` likewise for MXFP4. Tensors a ``Rule.float32`` maps that the checkpoint stores
    float32 are read in float32, in units of their own. A ``Rule.stacked`` tensor's outputs are slabs
    (``engine.plan.Slab``) of HF tensors holding every expert, planned in one run in one file.
    With ``cut_at_holders`` a unit is also cut where the rank holding most of its tensors changes
    (at EP, each rank's experts of a layer are units of their own), so that each can be mapped by
    the rank holding it (``distconv.weights``).
    ``read_at``: which rank reads a stored chunk: ``saver``, the rank at the position of the one
    that saved it (each rank reads its own shard), or ``writer``, the unit's writer, which then
    reads its units whole and gathers nothing (where every rank sees every file: a shared file
    system, or one node).
    """
    if read_at not in READ_AT:
        raise DistconvError(f"--read-at {read_at}: choose {' or '.join(READ_AT)}")
    if not 1 <= writers <= world:
        raise DistconvError(f"--writers {writers} must be between 1 and the number of ranks ({world})")
    # sorted by the stored names (the outputs' order), then named as the mappings name them
    items = sorted((i for t in ckpt.tensors.values() for i in items_of(t, spec.num_layers, spec.num_experts)), key=_order)
    items = [dataclasses.replace(i, name=canonical(i.name, spec.multi_latent_attention)) for i in items]
    by_unit: dict[tuple[int, int | str], list[Part]] = {}
    for item in items:
        unit = _order(item)
        by_unit.setdefault((unit[0], item.layer if item.layer is not None else item.name), []).append(item)

    units: list[Unit] = []
    named: list[list[tuple[str, torch.Tensor, Slab | None]]] = []
    indexes: dict[str, dict[tuple[int, ...], list[Chunk]]] = {}

    float32_rules = [r for r in family.rules if r.float32]

    def float32(item: Part) -> bool:
        return (dtype != torch.float32 and ckpt.tensors[item.key].dtype == torch.float32
                and any(r.match(item.name) is not None for r in float32_rules))

    def reads_of(item: Part, pos: int, itemsize: int) -> list[Read]:
        tensor = ckpt.tensors[item.key]
        if item.key not in indexes:
            indexes[item.key] = _chunks_by_index(tensor, len(item.index))
        return _reads_for(item, pos, tensor, indexes[item.key].get(item.index, []), world, itemsize)

    def holder(group: list[Part]) -> int:
        """The rank holding most of a group's elements (the lowest of a tie)."""
        return most_held([read for item in group for read in reads_of(item, 0, 1)], world)

    cut = holder if cut_at_holders else None
    for unit_items in by_unit.values():
        kept: list[Part] = []
        rest: list[Part] = []
        for item in unit_items:
            (kept if float32(item) else rest).append(item)
        for kind, part in ((torch.float32, kept), (None, rest)):
            for piece in _split(part, window, (kind or dtype).itemsize, family, cut) if part else ():
                reads = []
                for pos, item in enumerate(piece):
                    reads += reads_of(item, pos, (kind or dtype).itemsize)
                metas = [(item.name, torch.empty(item.shape, dtype=kind or dtype, device="meta")) for item in piece]
                outs = [(name, t, Slab(*slab) if (slab := family.slab_of(source, spec)) else None)
                        for name, t, source in family.export_tensors(metas, spec, fp8_rest, mxfp4_rest)]
                units.append(Unit(piece, reads, dtype=kind))
                named.append(outs)

    # a writer's range may not start inside a tensor of slabs
    cuttable = [all(slab is None or slab.index == 0 for _, _, slab in outs) for outs in named]
    ranges = _ranges([sum(t.numel() * t.element_size() for _, t, _ in outs) for outs in named], writers, cuttable)
    writer_ranks = [i * world // writers for i in range(writers)]
    outputs, files = _assign_files(named, ranges, max_shard_size)
    for unit_outputs, unit, r in zip(outputs, units, [r for r, rng in enumerate(ranges) for _ in rng]):
        unit.outputs, unit.writer = unit_outputs, writer_ranks[r]
        if read_at == "writer":
            by_part: dict[int, list[Read]] = {}
            for read in unit.reads:
                by_part.setdefault(read.part, []).append(read)
            unit.reads = [_whole_read(item, by_part[pos], unit.writer) for pos, item in enumerate(unit.parts)]
    order = [u for batch in itertools.zip_longest(*ranges) for u in batch if u is not None]
    flat = [o for outs in outputs for o in outs]
    return Plan([units[u] for u in order], flat, files, dtype, world, writer_ranks[: len(ranges)])


def _ranges(sizes: list[int], parts: int, cuttable: list[bool]) -> list[range]:
    """Cut unit indices into at most ``parts`` contiguous ranges of about equal total size, each
    starting at a ``cuttable`` unit."""
    total, bounds, acc = sum(sizes), [0], 0
    for i, n in enumerate(sizes):
        acc += n
        if len(bounds) < parts and acc >= total * len(bounds) / parts and i + 1 < len(sizes) and cuttable[i + 1]:
            bounds.append(i + 1)
    bounds.append(len(sizes))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _assign_files(
    named: list[list[tuple[str, torch.Tensor, Slab | None]]], ranges: list[range], max_shard_size: int
) -> tuple[list[list[Output]], list[str]]:
    """Fill safetensors files in order, each at most ``max_shard_size`` bytes (HF naming); a
    writer's range always starts a new file; a tensor of slabs is sized whole at its first slab,
    and its other slabs follow it in that file."""
    shard_of_name: dict[str, int] = {}
    shard_of: list[list[int]] = []
    shard, size = -1, 0
    starts = {rng.start for rng in ranges}
    for g, outs in enumerate(named):
        if g in starts:
            shard, size = shard + 1, 0
        shard_of.append([])
        for name, t, slab in outs:
            if slab is None or slab.index == 0:
                if name in shard_of_name:
                    raise DistconvError(f"two checkpoint tensors map to the same HF tensor {name}")
                n = t.numel() * t.element_size() * (slab.count if slab else 1)
                if size and size + n > max_shard_size:
                    shard, size = shard + 1, 0
                shard_of_name[name] = shard
                size += n
            shard_of[-1].append(shard_of_name[name])
    total = shard + 1
    files = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    outputs = [
        [Output(name, tuple(t.shape), t.dtype, files[s], slab) for (name, t, slab), s in zip(outs, shards)]
        for outs, shards in zip(named, shard_of)
    ]
    try:
        whole([o for outs in outputs for o in outs])
    except DistconvError as e:
        raise DistconvError(f"{e} (the {len(ranges)} writers' ranges or the expert order split it)") from None
    return outputs, files


@dataclasses.dataclass(frozen=True)
class Mapped:
    """A model's HF side, decided from its description alone: family, spec, config, dtypes, plan."""

    family: Family
    spec: ModelSpec
    config: Any
    plan: Plan
    dtype: torch.dtype  # the outputs' dtype (FP8's other tensors: this one)
    fp8: bool  # block-wise FP8 linear weights
    fp8_rest: torch.dtype | None
    mxfp4: bool  # MXFP4 experts (gpt-oss's release)
    mxfp4_rest: torch.dtype | None
    quantization: dict[str, Any] | None
    notes: tuple[str, ...]  # the family's warnings about this model (what a consumer may lack)


def map_model(ckpt: Checkpoint, spec: ModelSpec, user_config: Any, dtype: str, world: int, *, window: int,
              max_shard_size: int, writers: int, bos_eos: tuple[int | None, int | None] = (None, None),
              cut_at_holders: bool = False, read_at: str = "saver") -> Mapped:
    """The family, HF config and plan of a described model (``spec`` with its true vocab) in ``dtype``
    (``auto``, ``bf16``, ``fp16``, ``fp32`` or ``fp8``), checked against the HF model: what export and
    ``distconv.weights`` share, whether the model is a checkpoint or live. ``cut_at_holders`` and
    ``read_at``: ``make_plan``'s."""
    arch = (user_config.architectures or [None])[0] if user_config is not None else None
    family = pick_family(FAMILIES, spec, arch)
    has_output = "output_layer.weight" in ckpt.tensors
    if has_output == spec.tie_embeddings:
        raise DistconvError(
            f"args say tie_embeddings={spec.tie_embeddings} but the {'checkpoint' if ckpt.path else 'model'} "
            f"{'has' if has_output else 'has no'} output_layer.weight"
        )
    if user_config is not None:
        family.check_config(user_config, spec)
    config = user_config if user_config is not None else family.hf_config(spec, bos_token_id=bos_eos[0], eos_token_id=bos_eos[1])
    if dtype not in ("auto", "fp8", "mxfp4", *DTYPES):
        raise DistconvError(f"--dtype {dtype}: choose auto, bf16, fp16, fp32, fp8 or mxfp4")
    fp8 = dtype == "fp8"  # block-wise FP8 linear weights, everything else bf16
    mx = dtype == "mxfp4"  # MXFP4 experts (gpt-oss's release), everything else bf16
    if fp8 and not family.quantizable:
        raise DistconvError(f"--dtype fp8: {family.architecture} has no block-wise FP8 layout; choose bf16, fp16 or fp32"
                            + (" (or mxfp4)" if family.mxfp4 else ""))
    if mx and not family.mxfp4:
        raise DistconvError(f"--dtype mxfp4: {family.architecture} has no MXFP4 layout (gpt-oss has); choose "
                            "bf16, fp16 or fp32" + (" (or fp8)" if family.quantizable else ""))
    quantized = fp8 or mx
    out_dtype = spec.train_dtype if dtype == "auto" else torch.bfloat16 if quantized else DTYPES[dtype]
    # fp8, mxfp4: gathered in the model's precision and quantized from it; the rest in bf16
    gather_dtype = spec.train_dtype if quantized else out_dtype
    fp8_rest = out_dtype if fp8 else None
    mxfp4_rest = out_dtype if mx else None
    plan = make_plan(ckpt, spec, family, gather_dtype, world, max_shard_size=max_shard_size,
                     window=window, writers=writers, fp8_rest=fp8_rest, mxfp4_rest=mxfp4_rest,
                     cut_at_holders=cut_at_holders, read_at=read_at)
    _check_counts(plan, spec, ckpt)
    _check_against_hf(plan, config, family, spec)
    quantization = quantization_config() if fp8 else mxfp4.quantization_config() if mx else None
    return Mapped(family, spec, config, plan, out_dtype, fp8, fp8_rest, mx, mxfp4_rest, quantization, tuple(family.notes(spec) + family.serving_notes(spec)))


def hf_outputs(mapped: Mapped, unit: Unit, full: list[torch.Tensor]) -> Iterator[tuple[str, str, torch.Tensor]]:
    """A gathered unit's HF tensors (contiguous), each as ``(Megatron name, HF name, tensor)``, in plan order."""
    parts = [(part.name, tensor) for part, tensor in zip(unit.parts, full)]
    for name, out, source in mapped.family.export_tensors(parts, mapped.spec, mapped.fp8_rest, mapped.mxfp4_rest):
        yield source, name, out.contiguous()


@dataclasses.dataclass(frozen=True)
class ExportOptions(RunOptions):
    """``distconv export``: a Megatron checkpoint into an HF folder (or one ``model.pt``)."""

    iteration: int | str | None = None
    hf_config: str | Path | None = None
    tokenizer: str | Path | None = None
    dtype: str = "auto"
    max_shard_size: str | int = "5GB"
    device: str = "auto"
    writers: int = 1
    read_at: str = "saver"
    format: str = "safetensors"
    allow_nonfinite: bool = False
    vocab_size: int | None = None


class ExportJob:
    """Everything planning decides, identical on every rank; ``convert`` streams it."""

    kind = "export"
    complete = staticmethod(complete)  # what an HF folder needs (the marker's check)

    def __init__(self, load: str | Path, opts: ExportOptions, world: int) -> None:
        fmt = opts.format
        if fmt not in FORMATS:
            raise DistconvError(f"--format {fmt}: choose {' or '.join(FORMATS)}")
        self.format, self.opts = fmt, opts
        max_shard_size, writers = (1 << 62, 1) if fmt == "torch" else (opts.max_shard_size, opts.writers)  # one model.pt
        if opts.dtype in ("fp8", "mxfp4") and fmt != "safetensors":
            raise DistconvError(f"--dtype {opts.dtype} writes safetensors only (the hub's format); drop --format torch")
        self.ckpt: Checkpoint = describe(load, opts.iteration)
        spec = spec_from_args(self.ckpt.args)
        user_config, self.config_dir, config_warnings = _load_hf_config(opts.hf_config)
        self.tokenizer, self.tokenizer_source, tokenizer_warnings = _load_tokenizer(opts.tokenizer, self.ckpt)
        vocab, self.vocab_source, warning, vocab_file = _true_vocab(spec, user_config, self.tokenizer, self.ckpt, opts.vocab_size)
        self.warnings: list[str] = config_warnings + tokenizer_warnings + ([warning] if warning else [])
        bos, eos, self.tokens_source = special_tokens(self.tokenizer, self.ckpt.args) if user_config is None else (None, None, "--hf-config")
        self.window = parse_size(opts.window, "--window")
        shard_size = parse_size(max_shard_size, "--max-shard-size")
        self.mapped = mapped = map_model(self.ckpt, spec.with_vocab(vocab), user_config, opts.dtype, world, window=self.window,
                                         max_shard_size=shard_size, writers=writers, bos_eos=(bos, eos),
                                         read_at=opts.read_at)
        self.warnings += mapped.notes
        self.identity = marker.source_of(self.ckpt, {
            "dtype": str(self.dtype).removeprefix("torch."), "max_shard_size": shard_size,
            "hf_config": str(self.config_dir) if self.config_dir else None, "tokenizer": self.tokenizer_source,
            "format": fmt, "vocab_size": vocab, "vocab_source": self.vocab_source,
            **({"allow_nonfinite": True} if opts.allow_nonfinite else {}),
            **({"quantization": self.quantization} if self.quantization else {})})
        self.save = Path(opts.save).resolve()
        self.inputs = (load, self.ckpt.path, opts.hf_config, self.tokenizer_source, *read_files(load, self.ckpt),
                       *files_in(self.config_dir), *files_in(self.tokenizer_source), vocab_file)
        refuse_overlap(self.save, self.inputs)
        self.reader = open_reader(self.ckpt, collective=True)
        self.small_files = ("config.json, generation_config.json, model.safetensors.index.json, distconv.json"
                            " (and the tokenizer files when there is a tokenizer)")

    family = property(lambda self: self.mapped.family)
    spec = property(lambda self: self.mapped.spec)
    config = property(lambda self: self.mapped.config)
    plan = property(lambda self: self.mapped.plan)
    dtype = property(lambda self: self.mapped.dtype)
    fp8 = property(lambda self: self.mapped.fp8)
    mxfp4 = property(lambda self: self.mapped.mxfp4)
    quantization = property(lambda self: self.mapped.quantization)

    @property
    def dtype_name(self) -> str:
        """The output dtype in words: ``bfloat16``, ``fp8 (block-wise e4m3, 128x128) + bfloat16`` or
        ``mxfp4 (e2m1, an e8m0 scale per 32) + bfloat16``."""
        name = str(self.dtype).removeprefix("torch.")
        if self.mxfp4:
            return f"mxfp4 (e2m1, an e8m0 scale per {mxfp4.BLOCK}) experts + {name}"
        return f"fp8 (block-wise e4m3, {'x'.join(map(str, self.quantization['weight_block_size']))}) + {name}" if self.fp8 else name

    def summary(self, world: int) -> str:
        ckpt, spec, plan = self.ckpt, self.spec, self.plan
        tp, pp, ep, etp = parallel_sizes(ckpt.args)
        experts = f" EP{ep}" + (f" ETP{etp}" if etp != tp else "") if spec.num_experts else ""
        return "\n".join([
            f"checkpoint  {ckpt.path} (iteration {ckpt.iteration}, {ckpt.format}, trained at TP{tp} PP{pp}{experts}, saved by {ckpt.writers} ranks)",
            f"model       {self.family.architecture} ({'from --hf-config' if self.config_dir else 'inferred from args'}): "
            f"{spec.num_layers} layers, hidden {spec.hidden_size}, heads {spec.num_attention_heads}/{spec.num_query_groups}"
            + (f", {spec.num_experts} experts (top {spec.moe_topk}) in {sum(spec.moe_layers)} layers" if spec.num_experts else ""),
            f"vocab       {spec.vocab_size} of {spec.padded_vocab_size} padded rows, from {self.vocab_source}",
            f"tokens      bos {getattr(self.config, 'bos_token_id', None)}, eos {getattr(self.config, 'eos_token_id', None)}, from {self.tokens_source}",
            f"plan        {world} rank(s), {len(plan.units)} units, {plan.total_bytes / 1e9:.3f} GB of {self.dtype_name} "
            f"into {len(plan.files)} file(s); optimizer and other state ({ckpt.other_bytes / 1e9:.3f} GB) not read",
        ])

    def convert(self, comm: Comm, tmp: Path, tracker: Tracker) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """Walk the units: read ahead, gather on each unit's writer, and map + write behind."""
        plan = self.plan
        mine = [o for u in plan.units if u.writer == comm.rank for o in u.outputs]
        shards = self._shard_writer(tmp, mine) if mine else None
        nonfinite: dict[str, int] = {}  # HF name -> NaN/Inf count, of this rank's outputs

        def write_unit(index: int, full: list[torch.Tensor]) -> None:
            found = []
            for source, name, out in hf_outputs(self.mapped, plan.units[index], full):
                if count := nonfinite_count(out):
                    nonfinite[name] = count
                    found.append(nonfinite_entry(source, name, count, out))
                shards.write(name, out)
            if found and not self.opts.allow_nonfinite:
                raise nonfinite_error(found, "the model would produce garbage (stopped at the first tensors found "
                                      "holding any; --allow-nonfinite exports them)")

        writer = WriterThread(write_unit, stall_s=comm.timeout_s / 2) if shards else None  # peers wait --timeout
        stream = None
        try:
            stream = Stream(plan, self.reader, comm, self.window, threaded=comm.overlap_reads)
            # on GPUs the parts stay there: mapped, checked and quantized on the device (unmeasured)
            for index, full in stream.walk(lambda: writer.error if writer else None, on_device=True):
                if full is not None:
                    writer.put(index, full)
                tracker.advance(plan.read_bytes(plan.units[index]), shards.bytes_written if shards else 0)
            error = writer.join(last=shards.close) if writer else None  # the last fsync, bounded too
            tracker.converted(shards.bytes_written if shards else 0)
            comm.agree(error)  # every shard file is complete
            found = {k: v for part in comm.collect(nonfinite) for k, v in part.items()}
            if found:
                self.warnings.append(f"exported {len(found)} tensor(s) holding NaN or Inf (--allow-nonfinite)")
                if comm.rank == 0:
                    warn(self.warnings[-1])
            stream.close()
            fields = {"architecture": self.family.architecture, "save": str(self.save), "nonfinite": found, "vocab_size": self.spec.vocab_size, "vocab_source": self.vocab_source,
                      "format": self.format, "quantization": self.quantization}
            return fields, getattr(shards, "sums", {})
        except BaseException:
            if stream is not None:  # joined: a load in flight is one every rank started
                stream.close()
            if writer is not None:
                writer.join(discard=True)
            if shards is not None and not writer.alive:  # a stuck writer keeps its file
                shards.abort()
            raise

    def _shard_writer(self, tmp: Path, outputs: list) -> ShardWriter | TorchFileWriter:
        if self.format == "safetensors":
            return ShardWriter(tmp, outputs)
        self.config.dtype = self.dtype
        return TorchFileWriter(tmp, outputs, self.config.to_dict())

    def finish(self, tmp: Path, report: dict[str, Any]) -> None:
        """After the shards: config, generation config, tokenizer and the index."""
        write_config(tmp, self.config, self.dtype, self.quantization)
        write_generation_config(tmp, self.config, self.config_dir)
        if self.tokenizer is not None:
            write_tokenizer(tmp, self.tokenizer)
        if self.format == "safetensors":
            write_index(tmp, self.plan.outputs)

    def done_text(self, report: dict[str, Any]) -> str:
        return (f"wrote {self.family.architecture} to {self.save}: {self.plan.tensors} tensors, "
                f"{self.plan.total_bytes / 1e9:.3f} GB in {report['seconds']['total']:.1f} s ({report['write_gbps']:.3f} GB/s)")


def export(load: str | Path, save: str | Path, **options: Any) -> dict[str, Any]:
    """Convert a Megatron checkpoint (torch_dist or legacy) into an HF folder; collective over all ranks.

    ``options`` are ``ExportOptions``' fields. Returns a small report (the same on every rank).
    Raises ``DistconvError`` on every rank if any rank fails; ``save`` is then left untouched. A
    ``save`` that already holds a finished export of the same source and options (its
    ``distconv.json`` checks out) is skipped unless ``overwrite``. ``dry_run`` prints the plan and
    reads nothing; ``report`` also writes the JSON run report to that path. NaN or Inf in an
    exported tensor is an error naming the tensors unless ``allow_nonfinite``; then the report
    counts them per tensor. ``vocab_size`` sets the true (unpadded) vocab size, over any
    tokenizer or args.

    ``export()`` is also the post-training hook: inside a job whose ``torch.distributed`` group
    already exists it reuses that group and leaves it as it was; in a plain process it runs as a
    group of one.
    """
    opts = ExportOptions(save=save, **options)
    return launch(lambda world: ExportJob(load, opts, world), opts, opts.device)


def nonfinite_count(t: torch.Tensor) -> int:
    """How many NaN/Inf values ``t`` holds. A sum is finite unless some value is not (or it
    overflows), and costs far less than ``isfinite``, which only then counts them. An FP8 (e4m3fn)
    weight has no Inf and cannot be summed: its NaNs are the bytes ``0x7F`` and ``0xFF``, one byte
    compared per value (``fp8.quantize`` writes NaN for every NaN and Inf it is given)."""
    if t.dtype == FP8:
        return int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())
    if not t.is_floating_point() or torch.isfinite(t.sum()):
        return 0
    return int(torch.isfinite(t).logical_not().sum())


def nonfinite_entry(source: str, name: str, count: int, t: torch.Tensor) -> str:
    """One HF tensor holding ``count`` NaN/Inf values, for ``nonfinite_error``."""
    return f"{name} (from Megatron {source}): {count} of {t.numel()}"


def nonfinite_error(found: list[str], outcome: str) -> DistconvError:
    """The one error for HF tensors holding NaN or Inf (``found``: ``nonfinite_entry`` lines)."""
    listed = "; ".join(found[:4]) + (" ..." if len(found) > 4 else "")
    return DistconvError(f"NaN or Inf values in HF tensor {listed}: {outcome}")

