"""What import and reshard share: the target layout, and the job that writes a Megatron torch_dist save root.

Both plan the target's chunks exactly as megatron-core's ``GPTModel`` saves them at the target
TP x PP (x EP x ETP; ``distconv.megatron.catalogue``): a unit per chunk, written by the rank
``target rank % world`` (so any world size works), its reads all on that rank. Where a chunk's
data comes from is the direction's: ``directions.import_`` (HF-named tensors through the family
tables) and ``directions.reshard`` (a Megatron checkpoint, re-chunked).

The sink (``distconv.megatron.save``) asks for each chunk when its writer reaches it, so a rank
holds the chunks its ``--window`` reads ahead (``engine.stream``), whatever the model size. Not
written: optimizer state, RNG state, ``_extra_state`` contents (written empty, as the local and
non-fp8 TE specs save them).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch

from distconv.directions.export import nonfinite_count
from distconv.engine import marker
from distconv.engine.comm import Comm
from distconv.engine.plan import Output, Part, Plan, Read, Unit
from distconv.engine.progress import Tracker
from distconv.engine.run import RunOptions
from distconv.engine.stream import Reader, Stream, heap_trimmer
from distconv.errors import DistconvError
from distconv.megatron.catalogue import ExtraState, Shard, Target, check_layout
from distconv.megatron.checkpoint import TRACKER, iteration_dir
from distconv.megatron.save import complete, save_root
from distconv.spec import ModelSpec


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


def target_layout(opts: MegatronOptions, spec: ModelSpec, impl: str, grouped: bool,
                  per_layer: bool) -> tuple[Target, dict[str, Any]]:
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


def refuse_nonfinite(data: torch.Tensor, shard: Shard, source: str) -> None:
    """A chunk holding NaN or Inf is an error naming it and the source tensors it was read from:
    a model holding any produces garbage (export alone has ``--allow-nonfinite``)."""
    if count := nonfinite_count(data):
        raise DistconvError(f"NaN or Inf values in {shard.key} (the chunk at {list(shard.offsets)}, read from {source}): "
                            f"{count} of {data.numel()}; the model would produce garbage")


def chunk_plan(chunks: list[tuple[Shard, torch.dtype, list[Read]]], world: int, folder: str, dtype: torch.dtype) -> Plan:
    """A unit per target chunk (its shard, stored dtype and reads; the reads are made its owner's),
    each rank's in the order megatron-core's save hands DCP its chunks: by key (first seen among the
    rank's), then as given; each output in its owner's DCP file ``folder/__{rank}_0.distcp``."""
    units = []
    for shard, chunk_dtype, reads in chunks:
        owner = shard.target_rank % world
        units.append(Unit([Part(shard.name, shard.key, (), shard.sizes)], [dataclasses.replace(r, rank=owner) for r in reads],
                          [Output(shard.key, shard.sizes, chunk_dtype, f"{folder}/__{owner}_0.distcp", shard)], owner,
                          chunk_dtype))
    first: dict[tuple[int, str], int] = {}  # (owner, key) -> where the owner's first chunk of the key is
    for n, unit in enumerate(units):
        first.setdefault((unit.writer, unit.parts[0].key), n)
    ordered = sorted(range(len(units)), key=lambda n: (first[(units[n].writer, units[n].parts[0].key)], n))
    owners = sorted({u.writer for u in units})
    return Plan([units[n] for n in ordered], [o for u in units for o in u.outputs], [], dtype, world, owners)


class ToMegatron:
    """A job writing a Megatron torch_dist save root: its chunk plan streamed into megatron-core's
    save, then the marker. A direction sets the attributes below in its ``__init__``."""

    kind: str
    spec: ModelSpec  # with the target's padded vocab
    plan: Plan
    reader: Reader  # local: a rank reads its own chunks
    extras: list[ExtraState]
    common: dict[str, Any]
    iteration: int | str
    save: Path
    inputs: tuple[str | Path | None, ...]
    identity: dict[str, Any]
    warnings: list[str]
    layout: str  # e.g. "TP2 PP1"
    window: int  # bytes read ahead of the writer, per rank
    complete = staticmethod(complete)  # what a save root needs (the marker's check)

    def read_from(self, unit: Unit) -> str:
        """The source tensors ``unit``'s chunk is read from, for messages."""
        raise NotImplementedError

    def opened(self) -> contextlib.AbstractContextManager:
        """What holds the source open while the chunks are read (nothing, unless a direction says)."""
        return contextlib.nullcontext()

    def _planned(self, chunks: list[tuple[Shard, torch.dtype, list[Read]]], world: int) -> None:
        """The plan of ``chunks``, its files (a DCP file per rank that saves chunks or extra state,
        and the checkpoint's metadata files) and the small files, for ``--dry-run``."""
        folder = iteration_dir(self.iteration)
        self.plan = chunk_plan(chunks, world, folder, self.spec.train_dtype)
        ranks = sorted({u.writer for u in self.plan.units} | {e.target_rank % world for e in self.extras})
        self.plan.files = [f"{folder}/__{r}_0.distcp" for r in ranks] + [
            f"{folder}/{f}" for f in (".metadata", "common.pt", "metadata.json")]
        self.small_files = f"{TRACKER}, {marker.MARKER}"

    def convert(self, comm: Comm, tmp: Path, tracker: Tracker) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """Collective: every rank writes its chunks, each pulled from the stream when the save reaches it."""
        plan = self.plan
        mine = {(u.outputs[0].place.key, u.outputs[0].place.offsets): n for n, u in enumerate(plan.units)
                if u.writer == comm.rank}
        written = 0
        trim = heap_trimmer()  # chunks written and freed go back to the system, not to glibc's heaps

        def fetch(key: str, offsets: tuple[int, ...]) -> torch.Tensor:
            nonlocal written
            n = mine.get((key, offsets))
            if n is None:
                raise DistconvError(f"internal: rank {comm.rank} was asked for a chunk of {key} at {offsets} it does not own")
            trim()
            (data,) = stream.take(n)
            refuse_nonfinite(data, plan.units[n].outputs[0].place, self.read_from(plan.units[n]))
            written += plan.units[n].nbytes
            tracker.advance(plan.read_bytes(plan.units[n]), written)
            return data

        chunks = [(plan.units[n].outputs[0].place, plan.units[n].dtype) for n in mine.values()]
        extras = [e for e in self.extras if e.target_rank % comm.world == comm.rank]
        with self.opened():
            stream = Stream(plan, self.reader, comm, self.window, pull=True)
            try:
                known = save_root(comm, tmp, chunks=chunks, extras=extras, fetch=fetch, common=self.common,
                                  iteration=self.iteration)  # its files hashed as written
            finally:
                stream.close()  # joins the reader
        tracker.converted(written)
        misses = sum(comm.collect(stream.misses))
        return {"save": str(self.save), "layout": self.layout, "padded_vocab_size": self.spec.padded_vocab_size,
                "read_ahead_misses": misses}, known

    def finish(self, tmp: Path, report: dict[str, Any]) -> None:
        """Nothing besides the marker: the tracker file is written with the save."""

    def done_text(self, report: dict[str, Any]) -> str:
        return (f"wrote Megatron torch_dist {self.layout} to {self.save}: {self.plan.tensors} chunks, "
                f"{self.plan.total_bytes / 1e9:.3f} GB in {report['seconds']['total']:.1f} s ({report['write_gbps']:.3f} GB/s)")
