"""Reshard: Megatron torch_dist -> torch_dist at another TP x PP (model weights).

The new checkpoint is chunked exactly as a model built at the target layout saves it
(``distconv.layout``), so each rank of the next job reads its own files. Each rank loads the
chunks it will write straight from the source with ``dist_checkpointing.load`` (which cuts
them out of whatever chunking the source has), then all ranks save them together. No model
family is involved: tensors keep their keys, values and dtypes; only the vocab padding rows
are re-padded for the new TP like Megatron-LM pads (``make_vocab_size_divisible_by x TP``).

Not carried over: optimizer state, RNG state, ``_extra_state`` contents (written empty, as the
local and non-fp8 TE specs save them). Legacy ``mp_rank_*`` sources are read with the legacy
reader (QKV rows put in megatron-core order) and written as torch_dist (checkpoint_version 3.0).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from distconv.checkpoint import Checkpoint, describe
from distconv.errors import DistconvError
from distconv.gather import Comm
from distconv.legacy import LegacyReader
from distconv.layout import TP_AXIS, Shard, check_layout, extra_states, padded_vocab, shards_of, split_name
from distconv.megatron_write import MegatronRoot, extra_state_object, save_and_commit, sharded_tensor
from distconv.plan import Read, items_of
from distconv.read import Reader
from distconv.spec import ModelSpec, arg, spec_from_args

# replicated per-layer tensors and top-level tensors megatron-core's dense GPT saves
REPLICATED = {
    "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.layer_norm_bias",
    "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.layer_norm_bias",
    "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight",
    "self_attention.q_layernorm.bias", "self_attention.k_layernorm.bias",
    "self_attention.linear_proj.bias", "mlp.linear_fc2.bias",
    "decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "embedding.position_embeddings.weight",
}
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclasses.dataclass
class ReshardJob:
    ckpt: Checkpoint
    spec: ModelSpec  # with the target's padded vocab
    shards: list[Shard]
    args: argparse.Namespace
    common: dict[str, Any]


def plan_reshard(load: str | Path, iteration: int | str | None, tp: int, pp: int, ep: int, with_optimizer: bool) -> ReshardJob:
    if with_optimizer:
        raise DistconvError("--with-optimizer: resharding optimizer state is not supported yet; reshard the weights "
                            "and start the next job with --no-load-optim --no-load-rng (or --finetune)")
    if ep != 1:
        raise DistconvError("--expert-model-parallel-size: reshard handles dense GPT models only (EP 1)")
    ckpt = describe(load, iteration)
    source_spec = spec_from_args(ckpt.args)
    vocab = arg(ckpt.args, "vocab_size")
    divisible_by = int(arg(ckpt.args, "make_vocab_size_divisible_by", default=128))
    padded = padded_vocab(int(vocab) if vocab else source_spec.padded_vocab_size, divisible_by, tp)
    spec = dataclasses.replace(source_spec, padded_vocab_size=padded)
    check_layout(spec, tp, pp)
    shards = []
    for info in ckpt.tensors.values():
        for item in items_of(info, spec.num_layers):
            layer, sub = split_name(item.name)
            if sub not in TP_AXIS and sub not in REPLICATED:
                raise DistconvError(f"reshard does not know megatron-core's layout of {item.key} "
                                    "(supported: dense GPT layers)")
            shape = (padded,) + item.shape[1:] if item.key in VOCAB_KEYS else item.shape
            shards += shards_of(item.name, shape, spec, tp, pp)
    args = argparse.Namespace(**vars(ckpt.args))
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    args.expert_model_parallel_size, args.padded_vocab_size = ep, padded
    args.world_size, args.data_parallel_size = tp * pp, 1
    common = {k: v for k, v in ckpt.common.items() if k not in ("optimizer", "content_metadata", "rng_state")}
    common["args"] = args
    common["checkpoint_version"] = 3.0  # legacy sources are read into megatron-core's QKV order
    return ReshardJob(ckpt, spec, shards, args, common)


def _source_key(shard: Shard, ckpt: Checkpoint) -> str:
    """The source key holding ``shard``: stacked like the target, or per layer (legacy sources)."""
    return shard.key if shard.key in ckpt.tensors else shard.name


def _read(shard: Shard, ckpt: Checkpoint, n: int) -> Read | None:
    """The part of ``shard`` that exists in the source (vocab rows past the source's padding do not)."""
    key = _source_key(shard, ckpt)
    info = ckpt.tensors[key]
    lead = len(info.shape) - len(shard.sizes)  # 1 for a stacked source, 0 for a per-layer one
    offsets = list(shard.offsets[len(shard.offsets) - len(shard.sizes) - lead:])
    sizes = list((1,) * lead + shard.sizes)
    if shard.key in VOCAB_KEYS:
        sizes[0] = max(0, min(offsets[0] + sizes[0], info.shape[0]) - offsets[0])
        if sizes[0] == 0:
            return None
    dest = tuple(slice(0, s) for s in sizes[len(sizes) - len(shard.sizes):])
    return Read(n, 0, key, info.shape, tuple(offsets), tuple(sizes), dest)


def reshard(load: str | Path, save: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1,
            iteration: int | str | None = None, with_optimizer: bool = False, overwrite: bool = False,
            timeout_s: float = 1800.0, quiet: bool = False) -> dict[str, Any]:
    """Collective over all ranks; the chunks of target rank ``r`` are handled by rank ``r % world``."""
    start = time.perf_counter()
    comm = Comm.setup("cpu", timeout_s)
    try:
        job, error = None, None
        try:
            job = plan_reshard(load, iteration, tp, pp, ep, with_optimizer)
        except Exception as e:
            error = e
        comm.agree(error)
        assert job is not None
        if comm.rank == 0 and not quiet:
            print(f"reshard     {job.ckpt.path} -> TP{tp} PP{pp}: {len(job.shards)} chunks, padded vocab "
                  f"{job.spec.padded_vocab_size}, by {comm.world} rank(s); optimizer and RNG state not carried",
                  flush=True)
        root, state, error = None, {}, None
        mine = [(n, s) for n, s in enumerate(job.shards) if s.target_rank % comm.world == comm.rank]
        try:
            root = MegatronRoot(comm, save, overwrite, (load, job.ckpt.path))
        except Exception as e:
            error = e
        comm.agree(error)
        # one collective load per stored dtype, every rank taking part
        reader = LegacyReader(job.ckpt) if job.ckpt.format == "legacy" else Reader(job.ckpt.path, job.ckpt.metadata)
        for dtype in sorted({t.dtype for t in job.ckpt.tensors.values()}, key=str):
            todo = [(n, s, r) for n, s in mine
                    if job.ckpt.tensors[_source_key(s, job.ckpt)].dtype == dtype and (r := _read(s, job.ckpt, n))]
            loaded, error = [], None
            try:
                loaded = reader.read([r for _, _, r in todo], dtype)
            except Exception as e:
                error = e
            comm.agree(error)
            for (n, shard, read), data in zip(todo, loaded):
                full = torch.zeros(shard.sizes, dtype=dtype)
                full[read.dest] = data.reshape(full[read.dest].shape)
                state[f"t{n}"] = full
        for n, shard in mine:  # vocab chunks wholly beyond the source's rows stay zero
            if f"t{n}" not in state:
                state[f"t{n}"] = torch.zeros(shard.sizes, dtype=job.ckpt.tensors[_source_key(shard, job.ckpt)].dtype)
        state = {k: sharded_tensor(job.shards[int(k[1:])], v) for k, v in state.items()}
        for n, extra in enumerate(extra_states(job.spec, tp, pp)):
            if extra.target_rank % comm.world == comm.rank:
                state[f"x{n}"] = extra_state_object(extra)
        save_and_commit(comm, root, state, job.common, job.ckpt.iteration)
        seconds = time.perf_counter() - start
        if comm.rank == 0 and not quiet:
            print(f"wrote Megatron torch_dist TP{tp} PP{pp} to {Path(save).resolve()} in {seconds:.1f} s", flush=True)
        return {"save": str(Path(save).resolve()), "chunks": len(job.shards), "seconds": seconds,
                "padded_vocab_size": job.spec.padded_vocab_size}
    finally:
        comm.close()


def main_reshard(opts: Any) -> int:
    """CLI entry for ``distconv reshard``."""
    reshard(opts.load, opts.save, tp=opts.tensor_model_parallel_size, pp=opts.pipeline_model_parallel_size,
            ep=opts.expert_model_parallel_size, iteration=opts.iteration, with_optimizer=opts.with_optimizer,
            overwrite=opts.overwrite, timeout_s=opts.timeout, quiet=opts.quiet)
    return 0
