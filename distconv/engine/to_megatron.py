"""Configurations of the engine that write a Megatron torch_dist save root: import and reshard.

Both plan the target's chunks exactly as megatron-core's ``GPTModel`` saves them at the target
TP x PP (``distconv.engine.layout``); the chunks of target rank ``r`` are written by rank
``r % world``, so any world size works. What differs is where a chunk's data comes from:

- **import** (an HF folder, or MindSpore Transformers safetensors seen under HF names): the
  family table runs in reverse (``Transform.import_``; a rule's first Megatron spelling is the
  canonical name), and only the rows and columns of the HF tensors a chunk is made of are read
  (``safe_open(...).get_slice``), FP8 blocks dequantized as they are read;
- **reshard** (a Megatron checkpoint, torch_dist or legacy ``mp_rank_*``): no family is
  involved; a chunk is cut out of whatever chunking the source has, by this rank alone
  (``LocalReader``, ``LegacyReader``), and the vocab padding rows are re-padded for the new TP
  as Megatron-LM pads them (``make_vocab_size_divisible_by x TP``). Not carried over: optimizer
  state, RNG state, ``_extra_state`` contents (written empty, as the local and non-fp8 TE specs
  save them).

The sink (``distconv.sinks.megatron``) asks for each chunk when its writer reaches it, so a
rank holds one chunk at a time, whatever the model size.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from distconv.engine import marker
from distconv.engine.export import _nonfinite
from distconv.engine.gather import Comm
from distconv.engine.layout import (
    ExtraState, Shard, Target, canonical, check_layout, extra_states, known, padded_vocab, per_layer_keys, shards_of,
)
from distconv.engine.plan import Item as SourceItem
from distconv.engine.plan import items_of, numbered
from distconv.engine.progress import Tracker
from distconv.engine.run import RunOptions, parse_size, run
from distconv.engine.stream import ReadAhead, heap_trimmer
from distconv.errors import DistconvError
from distconv.families import FAMILIES, Family
from distconv.families.base import Rule
from distconv.sinks.folder import refuse_overlap
from distconv.sinks.megatron import save_root
from distconv.sources.checkpoint import TRACKER, Read, iteration_dir, overlaps
from distconv.sources.hf import HFSource, Source, expected_hf_tensors, open_hf
from distconv.sources.legacy import LegacyReader
from distconv.sources.megatron import describe, read_files
from distconv.sources.torch_dist import LocalReader
from distconv.spec import DTYPES, ModelSpec, arg, spec_from_args


@dataclasses.dataclass(frozen=True)
class MegatronOptions(RunOptions):
    """``distconv import`` and ``distconv reshard``: the Megatron save root to write."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallel size (None: TP, as Megatron-LM)
    moe_grouped_gemm: bool | None = None  # experts chunked as GroupedMLP saves them (import default: no; reshard: the source's)
    # the layer spec saved: transformer_engine or local (None: transformer_engine for import, the source's for reshard)
    transformer_impl: str | None = None
    dtype: str = "auto"  # import: the weights' dtype (auto: the source's); reshard keeps the source's
    divisible_by: int = 128  # import: vocab padding unit (reshard: the source's args)
    iteration: int | str | None = None  # import: the folder to write (default release); reshard: the one to read
    with_optimizer: bool = False  # reshard: not supported yet (an error)


@dataclasses.dataclass
class ChunkPlan:
    """The target's chunks and who writes them: ``shards[n]`` by rank ``shards[n].target_rank % world``."""

    shards: list[Shard]
    extras: list[ExtraState]
    dtypes: list[torch.dtype]  # each chunk's stored dtype
    reads: list[int]  # each chunk's planned bytes read from the source
    world: int
    folder: str  # the iteration folder, e.g. ``release``

    def owner(self, n: int) -> int:
        return self.shards[n].target_rank % self.world

    def nbytes(self, n: int) -> int:
        return _numel(self.shards[n].sizes) * self.dtypes[n].itemsize

    @property
    def tensors(self) -> int:
        return len(self.shards)

    @property
    def files(self) -> list[str]:
        """What megatron-core's save lays out: one DCP file per rank that owns chunks, and the metadata."""
        ranks = sorted({self.owner(n) for n in range(len(self.shards))} | {e.target_rank % self.world for e in self.extras})
        return [f"{self.folder}/__{r}_0.distcp" for r in ranks] + [
            f"{self.folder}/{f}" for f in (".metadata", "common.pt", "metadata.json")]

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in range(len(self.shards)))

    def bytes_read_by(self, rank: int) -> int:
        return sum(b for n, b in enumerate(self.reads) if self.owner(n) == rank)

    def bytes_written_by(self, rank: int) -> int:
        return sum(self.nbytes(n) for n in range(len(self.shards)) if self.owner(n) == rank)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def refuse_nonfinite(data: torch.Tensor, shard: Shard, source: str) -> None:
    """A chunk holding NaN or Inf is an error naming it and the source tensors it was read from:
    a model holding any produces garbage (export alone has ``--allow-nonfinite``)."""
    if count := _nonfinite(data):
        raise DistconvError(f"NaN or Inf values in {shard.key} (the chunk at {list(shard.offsets)}, read from {source}): "
                            f"{count} of {data.numel()}; the model would produce garbage")


class MegatronSinkJob:
    """What import and reshard share: the chunk plan streamed into a save root, and its marker."""

    kind: str
    spec: ModelSpec  # with the target's padded vocab
    plan: ChunkPlan
    common: dict[str, Any]
    iteration: int | str
    save: Path
    inputs: tuple[str | Path | None, ...]
    identity: dict[str, Any]
    warnings: list[str]
    layout: str  # e.g. "TP2 PP1"
    window: int  # bytes read ahead of the writer, per rank

    def read(self, n: int) -> torch.Tensor:
        """The data of chunk ``n`` (this rank owns it), in its stored dtype and shape."""
        raise NotImplementedError

    def source_files(self, rank: int) -> list[str]:
        """The source's files ``rank`` reads, for ``--dry-run``."""
        raise NotImplementedError

    def dry_run_text(self) -> str:
        plan = self.plan
        lines = [f"dry run: nothing is read or written. {plan.world} rank(s) would read and write:"]
        for rank in range(plan.world):
            mine = [n for n in range(len(plan.shards)) if plan.owner(n) == rank]
            files = self.source_files(rank)
            lines.append(f"  rank {rank}: {len(mine)} chunks, {plan.bytes_read_by(rank) / 1e6:.3f} MB read from "
                         f"{', '.join(files[:6]) or 'nothing'}{' ...' if len(files) > 6 else ''}; "
                         f"{plan.bytes_written_by(rank) / 1e6:.3f} MB written")
        lines.append(f"and would write {self.save}/ (atomically): {TRACKER}, {', '.join(plan.files)}, {marker.MARKER}")
        return "\n".join(lines)

    def convert(self, comm: Comm, tmp: Path, tracker: Tracker) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """Collective: every rank writes its chunks, each read when the writer reaches it."""
        plan = self.plan
        mine = {(s.key, s.offsets): n for n, s in enumerate(plan.shards) if plan.owner(n) == comm.rank}
        written = 0
        # the order megatron-core's save hands DCP the chunks: by key (first seen), then in plan order
        keys = list(dict.fromkeys(k for k, _ in mine))
        order = [c for key in keys for c in mine if c[0] == key]
        trim = heap_trimmer()  # chunks written and freed go back to the system, not to glibc's heaps
        ahead = ReadAhead(order, {c: plan.nbytes(n) for c, n in mine.items()}, lambda c: self.read(mine[c]),
                          self.window)

        def fetch(key: str, offsets: tuple[int, ...]) -> torch.Tensor:
            nonlocal written
            n = mine.get((key, offsets))
            if n is None:
                raise DistconvError(f"internal: rank {comm.rank} was asked for a chunk of {key} at {offsets} it does not own")
            trim()
            data = ahead.take((key, offsets))
            written += plan.nbytes(n)
            tracker.advance(plan.reads[n], written)
            return data

        shards = [plan.shards[n] for n in sorted(mine.values())]
        extras = [e for e in plan.extras if e.target_rank % comm.world == comm.rank]
        dtype_of = {(plan.shards[n].key, plan.shards[n].offsets): plan.dtypes[n] for n in mine.values()}
        try:
            save_root(comm, tmp, shards=shards, extras=extras, dtype_of=lambda s: dtype_of[(s.key, s.offsets)], fetch=fetch,
                      common=self.common, iteration=self.iteration)
        finally:
            ahead.close()
        tracker.converted(written)
        misses = sum(comm.collect(ahead.misses))
        known = {f"{plan.folder}/{f.name}": {"bytes": f.stat().st_size, "sha256": marker.sha256(f)}
                 for f in sorted((tmp / plan.folder).glob(f"__{comm.rank}_*.distcp"))}
        return {"save": str(self.save), "layout": self.layout, "padded_vocab_size": self.spec.padded_vocab_size,
                "read_ahead_misses": misses}, known

    def finish(self, tmp: Path, report: dict[str, Any]) -> None:
        """Nothing besides the marker: the tracker file is written with the save."""

    def done_text(self, report: dict[str, Any]) -> str:
        return (f"wrote Megatron torch_dist {self.layout} to {self.save}: {self.plan.tensors} chunks, "
                f"{self.plan.total_bytes / 1e9:.3f} GB in {report['seconds']['total']:.1f} s ({report['write_gbps']:.3f} GB/s)")


# ---- import: HF-named tensors through the family tables ------------------------------------

@dataclasses.dataclass(frozen=True)
class Item:
    """One Megatron tensor (per layer) and the HF tensors it is made of."""

    name: str
    hf: tuple[str, ...]
    rule: Rule
    shape: tuple[int, ...]
    copies: tuple[str, ...] = ()  # HF tensors present that must equal ``hf[0]`` (``Rule.mtp_copy``)


_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_HF_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def _check_counts(spec: ModelSpec, source: Source, what: str) -> None:
    """The config's layer and expert counts against the tensors the source stores, before any model
    of the config is built (on the meta device its modules still cost memory and time, per layer
    and per expert)."""
    names = source.names()
    for kind, pattern, said in (("layers", _HF_LAYER, spec.num_layers + spec.mtp_num_layers),
                                ("experts", _HF_EXPERT, spec.num_experts or 0)):
        stored = {int(m.group(1)) for n in names if (m := pattern.search(n))}
        if not numbered(stored, said):
            mtp = " (MTP layers included)" if kind == "layers" and spec.mtp_num_layers else ""
            held = f"{len(stored)} (numbered {min(stored)} to {max(stored)})" if stored else "none"
            raise DistconvError(f"{what}: the config says {said} {kind}{mtp}, but the safetensors store {held}; "
                                "no model is built from a config that contradicts the tensors")


def _items(family: Family, spec: ModelSpec, source: Source, expected: dict[str, tuple[int, ...]]) -> list[Item]:
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
        # MTP layers are the layers after the last decoder layer (``plan.mtp_as_layer``)
        layers = range(spec.num_layers + spec.mtp_num_layers) if "{layer}" in rule.megatron_names[0] else (None,)
        experts = range(spec.num_experts or 0) if "{expert}" in rule.megatron_names[0] else (None,)
        for layer, expert in itertools.product(layers, experts):
            fmt = {k: v for k, v in (("layer", layer), ("expert", expert)) if v is not None}
            hf = tuple(h.format(**fmt) for h in rule.hf_names)
            if not any(h in expected for h in hf):
                continue
            if not all(h in expected for h in hf):
                raise DistconvError(f"internal: {family.architecture} expects only some of {', '.join(hf)}")
            metas = tuple(torch.empty(expected[h], device="meta") for h in hf)
            out = rule.transform.import_(metas, spec)
            if any(tuple(out.shape[1:]) != tuple(m.shape[1:]) for m in metas):
                raise DistconvError(f"internal: the {rule.megatron_names[0]} transform is not row-wise; import cannot slice it")
            copies = tuple(c for c in rule.mtp_copies(spec) if c in have)  # optional: they repeat hf[0]
            items.append(Item(rule.megatron_names[0].format(**fmt), hf, rule, tuple(out.shape), copies))
            used.update(hf + copies)
    unused = sorted(have - used)
    tied_extra = {"lm_head.weight"} if spec.tie_embeddings else set()
    unused = [n for n in unused if n not in tied_extra]
    if unused:
        raise DistconvError(f"the source has tensors the {family.architecture} mapping does not use: "
                            f"{', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}")
    return items


def _source_dtype(items: Iterable[Item], source: Source) -> torch.dtype:
    """``--dtype auto``: the one dtype of the source's weights, leaving out tensors kept float32 in
    any model dtype (``Rule.float32``, ``Rule.hf_float32``); another mix is an error."""
    dtypes = {source.dtype(h) for item in items if not (item.rule.float32 or item.rule.hf_float32)
              for h in item.hf + item.copies}
    if len(dtypes) != 1:
        raise DistconvError(f"the source mixes dtypes {sorted(map(str, dtypes))}; pass --dtype")
    return dtypes.pop()


def read_shard(source: Source, item: Item, box: tuple[slice, ...], spec: ModelSpec, dtype: torch.dtype) -> torch.Tensor:
    """Read the ``box`` of one Megatron tensor: only the HF rows (and columns) it is made of.

    Running the transform on row numbers tells which row of which HF tensor each Megatron row
    comes from (0 marks vocab padding, which stays zero). The same rows of ``item.copies`` are read
    too and must be equal: Megatron holds one tensor where HF repeats it.
    """
    rows_in = [source.shape(h)[0] for h in item.hf]
    base = max(rows_in) + 1
    codes = tuple(torch.arange(n, dtype=torch.int64) + (i + 1) * base for i, n in enumerate(rows_in))
    rowmap = item.rule.transform.import_(codes, spec)[box[0]]
    out = torch.zeros(tuple(s.stop - s.start for s in box), dtype=dtype)
    for i, name in enumerate(item.hf):
        sel = rowmap // base == i + 1
        if not bool(sel.any()):
            continue
        rows = rowmap[sel] % base
        lo, hi = int(rows.min()), int(rows.max()) + 1
        data = source.read(name, (slice(lo, hi),) + box[1:])
        for copy in item.copies:
            if not torch.equal(source.read(copy, (slice(lo, hi),) + box[1:]), data):
                raise DistconvError(f"{copy} differs from {name}: megatron-core's MTP layers share the model's "
                                    f"{item.name.split('.')[0]} tensor, so the two must be equal")
        out[sel] = data.to(dtype)[rows - lo]
    return out


def megatron_args(spec: ModelSpec, tp: int, pp: int, ep: int, divisible_by: int, tokenizer: str | None,
                  etp: int | None = None, grouped_gemm: bool = False,
                  transformer_impl: str = "transformer_engine") -> argparse.Namespace:
    """Megatron-LM 0.16 training args describing ``spec`` (what ``spec_from_args`` reads back)."""
    rope = spec.rope_scaling or {}
    base = spec.rotary_base
    target = Target(tp, pp, ep, etp, grouped_gemm)
    return argparse.Namespace(
        **_moe_args(spec, grouped_gemm), **_mla_args(spec),
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads, kv_channels=spec.head_dim,
        group_query_attention=spec.num_query_groups != spec.num_attention_heads, num_query_groups=spec.num_query_groups,
        max_position_embeddings=spec.max_position_embeddings, seq_length=spec.max_position_embeddings,
        position_embedding_type=spec.position_embedding, rotary_base=int(base) if base == int(base) else base,
        rotary_percent=spec.rotary_percent, rotary_interleaved=spec.rotary_interleaved,
        rotary_seq_len_interpolation_factor=rope.get("factor") if rope.get("rope_type") == "linear" else None,
        use_rope_scaling=rope.get("rope_type") == "llama3", rope_scaling_factor=rope.get("factor", 8.0),
        normalization=spec.normalization, layernorm_epsilon=spec.norm_epsilon,
        layernorm_zero_centered_gamma=spec.zero_centered_gamma, swiglu=spec.gated_mlp, squared_relu=False,
        openai_gelu=False, bias_gelu_fusion=False, add_bias_linear=spec.add_bias_linear, add_qkv_bias=spec.add_qkv_bias,
        qk_layernorm=spec.qk_layernorm, untie_embeddings_and_output_weights=not spec.tie_embeddings,
        vocab_size=spec.vocab_size, padded_vocab_size=spec.padded_vocab_size, make_vocab_size_divisible_by=divisible_by,
        mtp_num_layers=spec.mtp_num_layers or None,
        # no tokenizer: no type either, or a job resuming with --use-checkpoint-args takes
        # HuggingFaceTokenizer without a path over its own --tokenizer-type and fails to build it
        tokenizer_type="HuggingFaceTokenizer" if tokenizer else None, tokenizer_model=tokenizer,
        window_size=spec.window_size,
        bf16=spec.train_dtype == torch.bfloat16, fp16=spec.train_dtype == torch.float16, params_dtype=spec.train_dtype,
        init_method_std=spec.init_std, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=target.expert_tp, world_size=target.world,
        data_parallel_size=target.stage_ranks // tp, ckpt_format="torch_dist",
        transformer_impl=transformer_impl,  # the keys written follow it (``layout.Target.te``)
    )


def _moe_args(spec: ModelSpec, grouped_gemm: bool) -> dict[str, Any]:
    """The MoE args Megatron-LM rebuilds the same model from (``num_experts`` None: dense)."""
    if not spec.num_experts:
        return {"num_experts": None}
    return dict(
        num_experts=spec.num_experts, moe_ffn_hidden_size=spec.moe_ffn_hidden_size, moe_router_topk=spec.moe_topk,
        moe_router_pre_softmax=spec.moe_pre_softmax, moe_router_score_function=spec.moe_score_function,
        moe_router_topk_scaling_factor=spec.moe_scaling_factor, moe_router_enable_expert_bias=spec.moe_expert_bias,
        moe_router_num_groups=spec.moe_num_groups, moe_router_group_topk=spec.moe_group_topk,
        moe_router_load_balancing_type=spec.moe_routing_type, moe_expert_capacity_factor=spec.moe_capacity_factor,
        moe_shared_expert_intermediate_size=spec.moe_shared_ffn_hidden_size,
        moe_shared_expert_gate=spec.moe_shared_gate,
        # every layer MoE: 1 (stacked keys); otherwise Megatron-LM's per-layer 0/1 list
        moe_layer_freq=1 if all(spec.moe_layers) else [int(m) for m in spec.moe_layers],
        moe_grouped_gemm=grouped_gemm,
    )


def _mla_args(spec: ModelSpec) -> dict[str, Any]:
    """Megatron-LM's multi-latent attention args (``--rope-type``: MLA's own RoPE, YaRN or plain)."""
    if not spec.multi_latent_attention:
        return {"multi_latent_attention": False}
    yarn = spec.rope_scaling if (spec.rope_scaling or {}).get("rope_type") == "yarn" else None
    return dict(
        multi_latent_attention=True, q_lora_rank=spec.q_lora_rank, kv_lora_rank=spec.kv_lora_rank,
        qk_head_dim=spec.qk_head_dim, qk_pos_emb_head_dim=spec.qk_pos_emb_head_dim, v_head_dim=spec.v_head_dim,
        rope_type="yarn" if yarn else "rope",
        **({"rotary_scaling_factor": yarn["factor"], **{k: yarn[k] for k in (
            "mscale", "mscale_all_dim", "original_max_position_embeddings", "beta_fast", "beta_slow")}} if yarn else {}),
    )


def _target(opts: MegatronOptions, spec: ModelSpec, impl: str, grouped: bool, per_layer: bool) -> tuple[Target, dict[str, Any]]:
    """The checked target layout, and the options the marker records for it (the expert ones for
    MoE models only). ``grouped`` is ``--moe-grouped-gemm``: only the local spec's GroupedMLP
    chunks experts by EP rank (transformer-engine's TEGroupedMLP saves them per expert)."""
    if impl not in ("transformer_engine", "local"):
        raise DistconvError(f"--transformer-impl {impl}: choose transformer_engine or local")
    if spec.multi_latent_attention and impl == "local":
        raise DistconvError("--transformer-impl local: multi-latent attention is written only as the transformer_engine "
                            "spec saves it (pass --transformer-impl transformer_engine; the local spec's layout of "
                            "MLA is not supported yet)")
    target = Target(opts.tp, opts.pp, opts.ep, opts.etp, grouped and impl == "local", per_layer,
                    te=impl == "transformer_engine")
    check_layout(spec, target)
    options = {"tp": opts.tp, "pp": opts.pp, "ep": opts.ep, "transformer_impl": impl}
    if spec.num_experts:
        options.update(etp=target.expert_tp, moe_grouped_gemm=grouped)
    return target, options


def family_for(config: Any) -> Family:
    arch = (getattr(config, "architectures", None) or [None])[0]
    by_name = {f.architecture: f for f in FAMILIES}
    if arch not in by_name:
        raise DistconvError(f"unsupported HF architecture {arch}; supported: {', '.join(sorted(by_name))}")
    if not by_name[arch].spec_fields:  # export only: no table reads its HF config yet
        importable = sorted(f.architecture for f in FAMILIES if f.spec_fields)
        raise DistconvError(f"import of {arch} is not supported yet (export is); importable: {', '.join(importable)}")
    return by_name[arch]


class ImportJob(MegatronSinkJob):
    """An HF-named source (HF folder, MindSpore Transformers) into a save root at TP x PP."""

    kind = "import"

    def __init__(self, source: HFSource, opts: MegatronOptions, world: int) -> None:
        tp, pp, ep = opts.tp, opts.pp, opts.ep
        tensors, config = source.tensors, source.config
        family = family_for(config)
        if opts.dtype != "auto" and opts.dtype not in DTYPES:
            raise DistconvError(f"--dtype {opts.dtype}: choose auto, bf16, fp16 or fp32")
        self.family, self.source, self.what = family, tensors, source.what
        spec = family.spec_from_hf_config(config, padded_vocab(int(config.vocab_size), opts.divisible_by, tp), torch.float32)
        _check_counts(spec, tensors, source.what)
        self.items = {item.name: item for item in _items(family, spec, tensors, expected_hf_tensors(config))}
        dtype = _source_dtype(self.items.values(), tensors) if opts.dtype == "auto" else DTYPES[opts.dtype]
        self.spec = dataclasses.replace(spec, train_dtype=dtype)
        experts = bool(self.spec.num_experts)
        if not experts and (ep != 1 or opts.etp not in (None, tp) or opts.moe_grouped_gemm):
            raise DistconvError(f"--expert-model-parallel-size {ep}, --expert-tensor-parallel-size, --moe-grouped-gemm: "
                                f"the {family.architecture} model has no experts")
        grouped = bool(opts.moe_grouped_gemm)
        self.target, options = _target(opts, self.spec, opts.transformer_impl or "transformer_engine", grouped,
                                       per_layer=experts and not all(self.spec.moe_layers))
        shards = [s for item in self.items.values() for s in shards_of(item.name, item.shape, self.spec, self.target)]
        self.iteration = "release" if opts.iteration is None else opts.iteration
        # megatron-core keeps some tensors float32 in a model of any dtype (``Rule.float32``)
        dtypes = [torch.float32 if self.items[s.name].rule.float32 else dtype for s in shards]
        self.plan = ChunkPlan(shards, extra_states(self.spec, self.target), dtypes,
                              [self._planned_read(s) for s in shards], world, iteration_dir(self.iteration))
        args = megatron_args(self.spec, tp, pp, ep, opts.divisible_by, source.tokenizer, opts.etp, grouped,
                             options["transformer_impl"])
        self.common = {"args": args, "checkpoint_version": 3.0, "iteration": 0 if self.iteration == "release" else int(self.iteration),
                       "num_floating_point_operations_so_far": 0}
        self.layout, self.window = self.target.describe(experts), parse_size(opts.window, "--window")
        self.save = Path(opts.save).resolve()
        self.inputs = source.inputs
        refuse_overlap(self.save, self.inputs)
        self.identity = {"source": source.identity, "options": {
            **options, "dtype": str(dtype).removeprefix("torch."), "divisible_by": opts.divisible_by,
            "iteration": self.iteration}}
        self.warnings: list[str] = list(source.warnings)

    def _parts(self, shard: Shard) -> list[tuple[Item, tuple[slice, ...]]]:
        """The Megatron tensors a chunk is cut from, each with its box (grouped-GEMM chunks: one per expert)."""
        return [(self.items[name], box) for name, box in shard.pieces()]

    def _planned_read(self, shard: Shard) -> int:
        """Bytes of the source a chunk is cut from: its rows and columns, padding rows excluded."""
        total = 0
        for item, box in self._parts(shard):
            rows = sum(self.source.shape(h)[0] for h in item.hf)
            kept = min(box[0].stop - box[0].start, max(0, rows - box[0].start))
            total += (kept * _numel(tuple(s.stop - s.start for s in box[1:])) * (1 + len(item.copies))
                      * max(self.source.dtype(h).itemsize for h in item.hf))
        return total

    def read(self, n: int) -> torch.Tensor:
        shard, dtype = self.plan.shards[n], self.plan.dtypes[n]
        parts = [read_shard(self.source, item, box, self.spec, dtype) for item, box in self._parts(shard)]
        data = torch.stack(parts) if shard.parts else parts[0]
        refuse_nonfinite(data, shard, ", ".join(h for item, _ in self._parts(shard) for h in item.hf))
        return data

    def source_files(self, rank: int) -> list[str]:
        where = getattr(self.source, "file_of", None)
        if where is None:
            return []
        names = {h for n, s in enumerate(self.plan.shards) if self.plan.owner(n) == rank
                 for item, _ in self._parts(s) for h in item.hf + item.copies}
        return sorted({where(h) for h in names})

    def summary(self, world: int) -> str:
        s = self.spec
        return (f"import      {self.what} as {self.family.architecture}: {s.num_layers} layers, hidden {s.hidden_size}, "
                f"heads {s.num_attention_heads}/{s.num_query_groups}, vocab {s.vocab_size} padded to {s.padded_vocab_size}\n"
                f"layout      {self.layout}, {len(self.plan.shards)} chunks of {str(s.train_dtype).removeprefix('torch.')} "
                f"({self.plan.total_bytes / 1e9:.3f} GB) written by {world} rank(s)")

# ---- reshard: a Megatron checkpoint, re-chunked ---------------------------------------------

VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


class ReshardJob(MegatronSinkJob):
    """A Megatron checkpoint (torch_dist or legacy) into a save root at another TP x PP (x EP x ETP)."""

    kind = "reshard"

    def __init__(self, load: str | Path, opts: MegatronOptions, world: int) -> None:
        tp, pp, ep = opts.tp, opts.pp, opts.ep
        if opts.with_optimizer:
            raise DistconvError("--with-optimizer: resharding optimizer state is not supported yet; reshard the weights "
                                "and start the next job with --no-load-optim --no-load-rng (or --finetune)")
        ckpt = self.ckpt = describe(load, opts.iteration)
        source_spec = spec_from_args(ckpt.args)
        vocab = arg(ckpt.args, "vocab_size")
        divisible_by = int(arg(ckpt.args, "make_vocab_size_divisible_by", default=128))
        padded = padded_vocab(int(vocab) if vocab else source_spec.padded_vocab_size, divisible_by, tp)
        self.spec = dataclasses.replace(source_spec, padded_vocab_size=padded)
        experts = bool(self.spec.num_experts)
        if opts.moe_grouped_gemm and not experts:
            raise DistconvError("--moe-grouped-gemm: the checkpoint's model has no experts")
        grouped = experts and bool(arg(ckpt.args, "moe_grouped_gemm", default=False) if opts.moe_grouped_gemm is None
                                   else opts.moe_grouped_gemm)
        # the source's spelling of the keys does not matter: its names are read back to canonical ones
        self.target, options = _target(
            opts, self.spec, opts.transformer_impl or arg(ckpt.args, "transformer_impl", default="transformer_engine"),
            grouped, per_layer=per_layer_keys(arg(ckpt.args, "moe_layer_freq", default=1), experts))
        # every per-layer (and per-expert) tensor of the source, under its canonical name
        self.items: dict[str, SourceItem] = {}
        for info in ckpt.tensors.values():
            for item in items_of(info, self.spec.num_layers, self.spec.num_experts):
                item = dataclasses.replace(item, name=canonical(item.name, self.spec.multi_latent_attention))
                if not known(item.name):
                    raise DistconvError(f"reshard does not know megatron-core's layout of {item.key} ({item.name})")
                self.items[item.name] = item
        shards = []
        for item in self.items.values():
            shape = (padded,) + item.shape[1:] if item.key in VOCAB_KEYS else item.shape
            shards += shards_of(item.name, shape, self.spec, self.target)
        self.iteration = ckpt.iteration
        self.sources = [self._reads(s, n) for n, s in enumerate(shards)]
        dtypes = [ckpt.tensors[self.items[s.name].key].dtype for s in shards]
        reads = [sum(_numel(r.sizes) for r in rs) * d.itemsize for rs, d in zip(self.sources, dtypes)]
        self.plan = ChunkPlan(shards, extra_states(self.spec, self.target), dtypes, reads, world,
                              iteration_dir(self.iteration))
        args = argparse.Namespace(**vars(ckpt.args))
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
        args.expert_model_parallel_size, args.padded_vocab_size = ep, padded
        args.world_size, args.data_parallel_size = self.target.world, self.target.stage_ranks // tp
        args.expert_tensor_parallel_size = self.target.expert_tp  # dense: TP, as Megatron-LM resolves it
        args.transformer_impl = options["transformer_impl"]
        if experts:
            args.moe_grouped_gemm = grouped
        self.common = {k: v for k, v in ckpt.common.items() if k not in ("optimizer", "content_metadata", "rng_state")}
        self.common["args"] = args
        self.common["checkpoint_version"] = 3.0  # legacy sources are read into megatron-core's QKV order
        self.layout, self.window = self.target.describe(experts), parse_size(opts.window, "--window")
        self.save = Path(opts.save).resolve()
        self.inputs = (load, ckpt.path, *read_files(load, ckpt))
        refuse_overlap(self.save, self.inputs)
        self.identity = marker.source_of(ckpt, options)
        self.warnings = []
        self._reader: LegacyReader | LocalReader | None = None

    def _reads(self, shard: Shard, n: int) -> list[Read]:
        """The parts of ``shard`` that exist in the source (vocab rows past the source's padding do
        not), one per source tensor it is cut from (grouped-GEMM chunks: one per expert)."""
        out = []
        for i, (name, box) in enumerate(shard.pieces()):
            item = self.items.get(name)
            if item is None:
                raise DistconvError(f"the checkpoint lacks {name}, part of {shard.key} at the target layout")
            info = self.ckpt.tensors[item.key]
            sizes = [s.stop - s.start for s in box]
            if shard.key in VOCAB_KEYS:
                sizes[0] = max(0, min(box[0].stop, item.shape[0]) - box[0].start)
                if sizes[0] == 0:
                    continue
            dest = ((slice(i, i + 1),) if shard.parts else ()) + tuple(slice(0, s) for s in sizes)
            out.append(Read(n, 0, item.key, info.shape, item.index + tuple(s.start for s in box),
                            (1,) * len(item.index) + tuple(sizes), dest))
        return out

    def read(self, n: int) -> torch.Tensor:
        shard, reads, dtype = self.plan.shards[n], self.sources[n], self.plan.dtypes[n]
        full = torch.zeros(shard.sizes, dtype=dtype)  # vocab rows beyond the source's stay zero
        if reads:
            if self._reader is None:
                self._reader = LegacyReader(self.ckpt) if self.ckpt.format == "legacy" else LocalReader(self.ckpt)
            for read, data in zip(reads, self._reader.read(reads, dtype)):
                full[read.dest] = data.reshape(full[read.dest].shape)
        refuse_nonfinite(full, shard, ", ".join(sorted({r.key for r in reads})))
        return full

    def source_files(self, rank: int) -> list[str]:
        files = set()
        for n, reads in enumerate(self.sources):
            if self.plan.owner(n) == rank:
                for read in reads:
                    files |= {c.file for c, _, _ in overlaps(read, self.ckpt.tensors[read.key].chunks)}
        return sorted(files)

    def summary(self, world: int) -> str:
        return (f"reshard     {self.ckpt.path} ({self.ckpt.format}) -> {self.layout}: {len(self.plan.shards)} chunks "
                f"({self.plan.total_bytes / 1e9:.3f} GB), padded vocab {self.spec.padded_vocab_size}, by {world} rank(s); "
                "optimizer and RNG state not carried")


# ---- entry points ---------------------------------------------------------------------------

def _run(make_job: Callable[[int], MegatronSinkJob], opts: MegatronOptions) -> dict[str, Any]:
    """Collective: one import or reshard on CPU ranks (reading and writing need no GPU)."""
    comm = Comm.setup("cpu", opts.timeout_s)
    try:
        result = run(comm, lambda: make_job(comm.world), opts)
    except BaseException:
        comm.close(clean=False)
        raise
    comm.close(clean=True)
    return result


def import_hf(load: str | Path, save: str | Path, **options: Any) -> dict[str, Any]:
    """HF folder -> Megatron torch_dist save root; ``options`` are ``MegatronOptions``' fields. Collective."""
    opts = MegatronOptions(save=save, **options)
    return _run(lambda world: ImportJob(open_hf(load), opts, world), opts)


def import_mindspore(load: str | Path, save: str | Path, *, ms_config: str | None, ms_args: Any,
                     **options: Any) -> dict[str, Any]:
    """MindSpore Transformers safetensors -> Megatron torch_dist save root; collective."""
    from distconv.sources.mindspore import open_mindspore

    opts = MegatronOptions(save=save, **options)
    return _run(lambda world: ImportJob(open_mindspore(load, ms_config, ms_args), opts, world), opts)


def reshard(load: str | Path, save: str | Path, **options: Any) -> dict[str, Any]:
    """Megatron checkpoint -> Megatron torch_dist save root at another layout; collective."""
    opts = MegatronOptions(save=save, **options)
    return _run(lambda world: ReshardJob(load, opts, world), opts)
