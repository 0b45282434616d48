"""Reshard: a Megatron checkpoint (torch_dist or legacy ``mp_rank_*``) into a torch_dist save root at
another TP x PP (x EP x ETP).

No family is involved: every stored tensor is read back to the catalogue's canonical names, and
a target chunk is cut out of whatever chunking the source has, by its writer alone (a local
read), the vocab padding rows re-padded for the new TP as Megatron-LM pads them
(``make_vocab_size_divisible_by x TP``). The source's args are kept, with the new layout and
``ckpt_format`` torch_dist.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from distconv.directions.to_megatron import MegatronOptions, ToMegatron, target_layout
from distconv.engine import marker
from distconv.engine.folder import refuse_overlap
from distconv.engine.plan import Part, Read, Unit, numel
from distconv.engine.run import launch, parse_size
from distconv.errors import DistconvError
from distconv.megatron.args import arg, layout_args, spec_from_args
from distconv.megatron.catalogue import (
    Shard,
    canonical,
    extra_states,
    items_of,
    known,
    padded_vocab,
    per_layer_keys,
    shards_of,
    vocab_names,
)
from distconv.megatron.source import describe, open_reader, read_files

VOCAB_KEYS = vocab_names()


class ReshardJob(ToMegatron):
    """A Megatron checkpoint (torch_dist or legacy) into a save root at another TP x PP (x EP x ETP)."""

    kind = "reshard"

    def __init__(self, load: str | Path, opts: MegatronOptions, world: int) -> None:
        tp = opts.tp
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
        hybrid = bool(source_spec.hybrid_pattern)  # megatron-core's one hybrid spec: transformer-engine's, per-layer keys
        self.target, options = target_layout(
            opts, self.spec, "transformer_engine" if hybrid else opts.transformer_impl
            or arg(ckpt.args, "transformer_impl", default="transformer_engine"),
            grouped, per_layer=hybrid or per_layer_keys(arg(ckpt.args, "moe_layer_freq", default=1), experts,
                                                        arg(ckpt.args, "linear_attention_freq") if source_spec.linear_attention else None))
        # every per-layer (and per-expert) tensor of the source, under its canonical name
        self.items: dict[str, Part] = {}
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
        self.extras = extra_states(self.spec, self.target)
        self._planned([(s, ckpt.tensors[self.items[s.name].key].dtype, self._reads(s)) for s in shards], world)
        self.reader = open_reader(ckpt, collective=False)
        args = argparse.Namespace(**vars(ckpt.args))
        for name, value in layout_args(self.target).items():
            setattr(args, name, value)
        args.padded_vocab_size, args.transformer_impl = padded, options["transformer_impl"]
        args.ckpt_format = "torch_dist"  # what is written, whatever the source was (legacy, fsdp_dtensor, torch_dcp)
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

    def _reads(self, shard: Shard) -> list[Read]:
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
            out.append(Read(0, 0, item.key, info.shape, item.index + tuple(s.start for s in box),
                            (1,) * len(item.index) + tuple(sizes), dest, numel(sizes) * info.dtype.itemsize))
        return out

    def read_from(self, unit: Unit) -> str:
        return ", ".join(sorted({r.key for r in unit.reads}))

    def summary(self, world: int) -> str:
        return (f"reshard     {self.ckpt.path} ({self.ckpt.format}) -> {self.layout}: {self.plan.tensors} chunks "
                f"({self.plan.total_bytes / 1e9:.3f} GB), padded vocab {self.spec.padded_vocab_size}, by {world} rank(s); "
                "optimizer and RNG state not carried")


def reshard(load: str | Path, save: str | Path, **options: Any) -> dict[str, Any]:
    """Megatron checkpoint -> Megatron torch_dist save root at another layout; collective."""
    opts = MegatronOptions(save=save, **options)
    return launch(lambda world: ReshardJob(load, opts, world), opts)
