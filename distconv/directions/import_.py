"""Import: an HF-named source (an HF folder, or MindSpore Transformers safetensors seen under HF
names) into a Megatron torch_dist save root.

The family table runs in reverse (``Transform.import_``; a rule's Megatron name is the
catalogue's canonical one): every Megatron tensor of the model is made of some HF tensors, and
a chunk's reads are boxes of Megatron tensors, of which only the rows and columns of the HF
tensors they are made of are read (``safe_open(...).get_slice``), FP8 blocks dequantized as
they are read (``FromHF``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any, Iterable

import torch

from distconv.directions.hf_model import hf_tensors
from distconv.directions.to_megatron import MegatronOptions, ToMegatron, target_layout
from distconv.engine.folder import refuse_overlap
from distconv.engine.plan import Read, Unit, numbered, numel
from distconv.engine.run import launch, parse_size
from distconv.errors import DistconvError
from distconv.families import FAMILIES, HUB_TYPES, Family, pick_family
from distconv.families.base import Rule
from distconv.hf.source import HFSource, Source, kept_open, open_hf
from distconv.megatron.args import linear_attention_freq, megatron_args, moe_layer_freq
from distconv.megatron.catalogue import Shard, extra_states, padded_vocab, per_layer_keys, shards_of
from distconv.spec import DTYPES, ModelSpec


@dataclasses.dataclass(frozen=True)
class Mapped:
    """One Megatron tensor (per layer) and the HF tensors the family maps it from."""

    name: str
    hf: tuple[str, ...]
    rule: Rule
    shape: tuple[int, ...]
    copies: tuple[str, ...] = ()  # HF tensors present that must equal ``hf[0]`` (``Rule.mtp_copy``)
    part: int = 0  # which of a joint rule's Megatron tensors (``Rule.megatron_names``)
    slab: int | None = None  # ``Rule.stacked``: the expert whose slab of the HF tensors it is made of


KEPT_OPEN = 64 << 20  # bytes read through one opening of a source file, its mapped pages resident meanwhile
_HF_LAYER = re.compile(r"^(?:model|backbone)\.layers\.(\d+)\.")  # backbone: Nemotron-H
_HF_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def _check_counts(spec: ModelSpec, family: Family, source: Source, what: str) -> None:
    """The config's layer and expert counts against the tensors the source stores, before any model
    of the config is built (on the meta device its modules still cost memory and time, per layer
    and per expert). Experts are counted by their names, or, where one tensor holds every expert
    of a layer (gpt-oss), by that tensor's first axis."""
    names = source.names()
    experts = spec.num_experts or 0
    stacks = {n: (source.shape(n) or (0,))[0] for n in names if family.holds_every_expert(n)}
    for name, held in stacks.items():
        if held != experts:
            raise DistconvError(f"{what}: the config says {experts} experts, but the safetensors' {name} holds {held}; "
                                "no model is built from a config that contradicts the tensors")
    mtp = 0 if family.mtp_apart else spec.mtp_num_layers  # MTP layers apart: not numbered among the model's
    counts = (("layers", _HF_LAYER, spec.num_layers + mtp),) + (
        () if stacks else (("experts", _HF_EXPERT, experts),))
    for kind, pattern, said in counts:
        stored = {int(m.group(1)) for n in names if (m := pattern.search(n))}
        if not numbered(stored, said):
            included = " (MTP layers included)" if kind == "layers" and mtp else ""
            held = f"{len(stored)} (numbered {min(stored)} to {max(stored)})" if stored else "none"
            raise DistconvError(f"{what}: the config says {said} {kind}{included}, but the safetensors store {held}; "
                                "no model is built from a config that contradicts the tensors")


def _items(family: Family, spec: ModelSpec, source: Source, expected: dict[str, tuple[int, ...]]) -> list[Mapped]:
    """Every Megatron tensor of the model, checked against what the source holds."""
    have = set(source.names())
    optional = {c for rule in family.rules for c in rule.mtp_copies(spec)}  # GLM-4.6 releases leave them out
    missing = sorted(set(expected) - have - optional)
    if missing:
        raise DistconvError(f"the source lacks tensors the {family.architecture} model needs: {', '.join(missing[:8])}"
                            f"{' ...' if len(missing) > 8 else ''}")
    wrong = sorted(n for n in expected if n in have and source.shape(n) != expected[n])
    if wrong:
        raise DistconvError("shape mismatch with the config: " + ", ".join(f"{n} {source.shape(n)} vs {expected[n]}" for n in wrong[:8]))
    items, used = [], set()
    for rule in family.rules:
        # MTP layers are the layers after the last decoder layer (``catalogue.mtp_as_layer``)
        layers = range(spec.num_layers + spec.mtp_num_layers) if "{layer}" in rule.megatron else (None,)
        experts = range(spec.num_experts or 0) if "{expert}" in rule.megatron else (None,)
        for layer, expert in itertools.product(layers, experts):
            if not rule.maps_layer(spec, layer):
                continue
            fmt = {k: v for k, v in (("layer", layer), ("expert", expert)) if v is not None}
            hf = tuple(family.hf_name(h.format(**fmt), spec) for h in rule.hf_names)
            if not any(h in expected for h in hf):
                continue
            if not all(h in expected for h in hf):
                raise DistconvError(f"internal: {family.architecture} expects only some of {', '.join(hf)}")
            metas = tuple(torch.empty(expected[h][1:] if rule.stacked else expected[h], device="meta") for h in hf)
            copies = tuple(c for c in rule.mtp_copies(spec) if c in have)  # optional: they repeat hf[0]
            for part, megatron in enumerate(rule.megatron_names):
                out = rule.import_rows(metas, spec, part)
                if not (rule.stacked or rule.whole) and any(tuple(out.shape[1:]) != tuple(m.shape[1:]) for m in metas):
                    raise DistconvError(f"internal: the {megatron} transform is not row-wise; import cannot slice it")
                items.append(Mapped(megatron.format(**fmt), hf, rule, tuple(out.shape), copies, part,
                                    expert if rule.stacked else None))
            used.update(hf + copies)
    unused = sorted(have - used)
    tied_extra = {"lm_head.weight"} if spec.tie_embeddings else set()
    unused = [n for n in unused if n not in tied_extra]
    if unused:
        why = [reason for prefix, reason in family.unconverted if any(n.startswith(prefix) for n in unused)]
        raise DistconvError(f"the source has tensors the {family.architecture} mapping does not use: "
                            f"{', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}"
                            + "".join(f" ({reason})" for reason in why))
    return items


def _source_dtype(items: Iterable[Mapped], source: Source) -> torch.dtype:
    """``--dtype auto``: the one dtype of the source's weights, leaving out tensors kept float32 in
    any model dtype (``Rule.float32``, ``Rule.hf_float32``); another mix is an error."""
    dtypes = {source.dtype(h) for item in items if not (item.rule.float32 or item.rule.hf_float32)
              for h in item.hf + item.copies}
    if len(dtypes) != 1:
        raise DistconvError(f"the source mixes dtypes {sorted(map(str, dtypes))}; pass --dtype")
    return dtypes.pop()


def read_slab(source: Source, item: Mapped, spec: ModelSpec) -> torch.Tensor:
    """The whole Megatron tensor of a ``Rule.stacked`` item (its expert's slab of each HF tensor) or
    a ``Rule.whole`` one (each HF tensor whole), mapped (the transform need not be row-wise: gpt-oss's
    transposes, DSA's folded norm)."""
    e = item.slab
    hf = tuple(source.read(h, ()) if e is None else source.read(h, (slice(e, e + 1),))[0] for h in item.hf)
    rows = item.rule.import_rows(hf, spec, item.part)
    return item.rule.import_values(rows, spec)


def read_shard(source: Source, item: Mapped, box: tuple[slice, ...], spec: ModelSpec, dtype: torch.dtype) -> torch.Tensor:
    """Read the ``box`` of one (not stacked) Megatron tensor: only the HF rows (and columns) it is made of.

    Running the transform on row numbers tells which row of which HF tensor each Megatron row
    comes from (0 marks vocab padding, which stays zero); the values are then those Megatron
    stores (``Transform.import_values``). The same rows of ``item.copies`` are read too and must be
    equal: Megatron holds one tensor where HF repeats it.
    """
    rows_in = [source.shape(h)[0] for h in item.hf]
    base = max(rows_in) + 1
    codes = tuple(torch.arange(n, dtype=torch.int64) + (i + 1) * base for i, n in enumerate(rows_in))
    rowmap = item.rule.import_rows(codes, spec, item.part)[box[0]]
    shape = tuple(s.stop - s.start for s in box)
    out = torch.empty(shape, dtype=dtype) if bool((rowmap > 0).all()) else torch.zeros(shape, dtype=dtype)
    for i, name in enumerate(item.hf):
        at = (rowmap // base == i + 1).nonzero().squeeze(1)  # the rows of ``out`` this tensor fills
        if not len(at):
            continue
        rows = rowmap[at] % base
        lo, hi = int(rows.min()), int(rows.max()) + 1
        data = source.read(name, (slice(lo, hi),) + box[1:])
        for copy in item.copies:
            if not torch.equal(source.read(copy, (slice(lo, hi),) + box[1:]), data):
                raise DistconvError(f"{copy} differs from {name}: megatron-core's MTP layers share the model's "
                                    f"{item.name.split('.')[0]} tensor, so the two must be equal")
        first, n = int(at[0]), len(at)
        if int(at[-1]) - first + 1 == n and hi - lo == n and bool((rows[1:] > rows[:-1]).all()):
            out[first:first + n] = data  # rows in order, into a block of rows: one copy
        else:
            out.index_copy_(0, at, data.index_select(0, rows - lo).to(dtype))
    return item.rule.import_values(out, spec)


class FromHF:
    """An HF-named source read under Megatron names: a read's box of Megatron tensor ``key`` is read
    from the HF tensors it is made of (``read_shard``; a stacked expert tensor from its slabs,
    ``read_slab``). Local: each rank reads alone."""

    collective = False

    def __init__(self, source: Source, items: dict[str, Mapped], spec: ModelSpec) -> None:
        self.source, self.items, self.spec = source, items, spec
        self._slab: tuple[str, torch.Tensor] | None = None  # the last stacked item read (its chunks come together)

    def read(self, reads: list[Read], dtype: torch.dtype) -> list[torch.Tensor]:
        return [self._read(self.items[r.key], tuple(slice(o, o + s) for o, s in zip(r.offsets, r.sizes)), dtype)
                for r in reads]

    def _read(self, item: Mapped, box: tuple[slice, ...], dtype: torch.dtype) -> torch.Tensor:
        if item.slab is None and not item.rule.whole:
            return read_shard(self.source, item, box, self.spec, dtype)
        if self._slab is None or self._slab[0] != item.name:  # gate and up chunks: one read of the slab
            self._slab = (item.name, read_slab(self.source, item, self.spec))
        return self._slab[1][box].to(dtype)

    def files(self, reads: list[Read]) -> list[str]:
        where = getattr(self.source, "file_of", None)
        names = {h for r in reads for h in self.items[r.key].hf + self.items[r.key].copies}
        return sorted({where(h) for h in names}) if where is not None else []


class ImportJob(ToMegatron):
    """An HF-named source (HF folder, MindSpore Transformers) into a save root at TP x PP."""

    kind = "import"

    def __init__(self, source: HFSource, opts: MegatronOptions, world: int) -> None:
        tp, ep = opts.tp, opts.ep
        tensors, config = source.tensors, source.config
        family = pick_family(FAMILIES, architecture=(getattr(config, "architectures", None) or [None])[0], importing=True)
        if opts.dtype != "auto" and opts.dtype not in DTYPES:
            raise DistconvError(f"--dtype {opts.dtype}: choose auto, bf16, fp16 or fp32")
        self.family, self.source, self.what = family, tensors, source.what
        spec = family.spec_from_hf_config(config, padded_vocab(int(config.vocab_size), opts.divisible_by, tp), torch.float32)
        _check_counts(spec, family, tensors, source.what)
        self.items = {item.name: item for item in _items(family, spec, tensors, hf_tensors(config, family, spec))}
        dtype = _source_dtype(self.items.values(), tensors) if opts.dtype == "auto" else DTYPES[opts.dtype]
        self.spec = dataclasses.replace(spec, train_dtype=dtype)
        experts = bool(self.spec.num_experts)
        if not experts and (ep != 1 or opts.etp not in (None, tp) or opts.moe_grouped_gemm):
            raise DistconvError(f"--expert-model-parallel-size {ep}, --expert-tensor-parallel-size, --moe-grouped-gemm: "
                                f"the {family.architecture} model has no experts")
        grouped = bool(opts.moe_grouped_gemm)
        hybrid = bool(self.spec.hybrid_pattern)  # megatron-core's one hybrid spec: transformer-engine's, per-layer keys
        self.target, options = target_layout(opts, self.spec, "transformer_engine" if hybrid else opts.transformer_impl
                                             or "transformer_engine", grouped,
                                             per_layer=hybrid or per_layer_keys(moe_layer_freq(self.spec), experts,
                                                                linear_attention_freq(self.spec) if self.spec.linear_attention else None))
        shards = [s for item in self.items.values() for s in shards_of(item.name, item.shape, self.spec, self.target)]
        self.iteration = "release" if opts.iteration is None else opts.iteration
        self.extras = extra_states(self.spec, self.target)
        # megatron-core keeps some tensors float32 in a model of any dtype (``Rule.float32``)
        self._planned([(s, torch.float32 if self.items[s.name].rule.float32 else dtype, self._reads(s)) for s in shards], world)
        self.reader = FromHF(tensors, self.items, self.spec)
        args = megatron_args(self.spec, self.target, divisible_by=opts.divisible_by, tokenizer=source.tokenizer,
                             grouped_gemm=grouped, transformer_impl=options["transformer_impl"])
        self.common = {"args": args, "checkpoint_version": 3.0, "iteration": 0 if self.iteration == "release" else int(self.iteration),
                       "num_floating_point_operations_so_far": 0}
        self.layout, self.window = self.target.describe(experts), parse_size(opts.window, "--window")
        self.save = Path(opts.save).resolve()
        self.inputs = source.inputs
        refuse_overlap(self.save, self.inputs)
        self.identity = {"source": source.identity, "options": {
            **options, "dtype": str(dtype).removeprefix("torch."), "divisible_by": opts.divisible_by,
            "iteration": self.iteration}}
        self.warnings: list[str] = list(source.warnings) + self.family.notes(self.spec)

    def _reads(self, shard: Shard) -> list[Read]:
        """A chunk's reads: a box of each Megatron tensor it is cut from (grouped-GEMM chunks: one per
        expert), costing the source the rows and columns it is made of, padding rows excluded."""
        out = []
        for i, (name, box) in enumerate(shard.pieces()):
            item, sizes = self.items[name], tuple(s.stop - s.start for s in box)
            itemsize = max(self.source.dtype(h).itemsize for h in item.hf)
            if item.slab is not None:  # its expert's slabs (read once for the item's chunks)
                nbytes = numel(sizes) * itemsize
            else:
                rows = sum(self.source.shape(h)[0] for h in item.hf)
                kept = min(sizes[0], max(0, rows - box[0].start))
                nbytes = kept * numel(sizes[1:]) * (1 + len(item.copies)) * itemsize
            dest = ((slice(i, i + 1),) if shard.parts else ()) + tuple(slice(0, s) for s in sizes)
            out.append(Read(0, 0, name, item.shape, tuple(s.start for s in box), sizes, dest, nbytes))
        return out

    def read_from(self, unit: Unit) -> str:
        return ", ".join(h for r in unit.reads for h in self.items[r.key].hf)

    def opened(self) -> contextlib.AbstractContextManager:
        """The source's files opened once per ``KEPT_OPEN`` bytes read through them, not at each read
        (a thousand reads of the benchmark's 2 GB model spent 1.3 s opening its one file)."""
        return kept_open(self.source, KEPT_OPEN)

    def summary(self, world: int) -> str:
        s = self.spec
        return (f"import      {self.what} as {self.family.architecture}: {s.num_layers} layers, hidden {s.hidden_size}, "
                f"heads {s.num_attention_heads}/{s.num_query_groups}, vocab {s.vocab_size} padded to {s.padded_vocab_size}\n"
                f"layout      {self.layout}, {self.plan.tensors} chunks of {str(s.train_dtype).removeprefix('torch.')} "
                f"({self.plan.total_bytes / 1e9:.3f} GB) written by {world} rank(s)")


def import_hf(load: str | Path, save: str | Path, **options: Any) -> dict[str, Any]:
    """HF folder -> Megatron torch_dist save root; ``options`` are ``MegatronOptions``' fields. Collective."""
    opts = MegatronOptions(save=save, **options)
    return launch(lambda world: ImportJob(open_hf(load, HUB_TYPES), opts, world), opts)


def import_mindspore(load: str | Path, save: str | Path, *, ms_config: str | None, ms_args: Any,
                     **options: Any) -> dict[str, Any]:
    """MindSpore Transformers safetensors -> Megatron torch_dist save root; collective."""
    from distconv.mindspore.source import open_mindspore

    opts = MegatronOptions(save=save, **options)
    return launch(lambda world: ImportJob(open_mindspore(load, ms_config, ms_args), opts, world), opts)
