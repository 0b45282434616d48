"""The single-process baseline for import and reshard, measured like ``baseline.py``.

    python tests/benchmarks/baseline_megatron.py --op import|reshard --load SRC --save OUT --tp 2 --pp 1 [--ep 1 --etp E] --stats STATS.json

What a user's script does, and what distconv itself did before import and reshard streamed:
the whole source is loaded into RAM (``safetensors.torch.load_file`` for an HF folder, one
``torch.distributed.checkpoint.load`` of every weight for a torch_dist checkpoint), every
chunk of the target layout is built from it in RAM, the source is dropped, and megatron-core's
``dist_checkpointing.save`` writes the chunks with its default torch_dist strategy. The target
layout, the chunks and ``common.pt`` come from distconv's own planning (``ImportJob`` /
``ReshardJob`` at world size 1), so only the memory and I/O strategy differ from distconv.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

from distconv.directions.import_ import ImportJob
from distconv.directions.reshard import ReshardJob
from distconv.directions.to_megatron import MegatronOptions
from distconv.engine.stream import assemble
from distconv.families import HUB_TYPES
from distconv.hf.source import open_hf
from distconv.megatron.checkpoint import TRACKER, iteration_dir
from distconv.megatron.model import no_device_calls, stand_ins
from distconv.megatron.save import extra_state_object, sharded_tensor

from tests.benchmarks.stats import current_rss, io_counters, warm_imports


class InMemory:
    """HF-named tensors held in RAM (what ``import_.read_shard`` reads its boxes from)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def read(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        return self.tensors[name][box]


class InMemoryReader:
    """A torch_dist checkpoint's weights held in RAM, read like a local ``TorchDistReader``."""

    collective = False

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def read(self, reads: list, dtype: torch.dtype) -> list[torch.Tensor]:
        return [self.tensors[r.key][tuple(slice(o, o + s) for o, s in zip(r.offsets, r.sizes))].to(dtype) for r in reads]


def load_whole(op: str, load: str, opts: MegatronOptions):
    """The job (distconv's plan at world size 1) with its source loaded whole into RAM."""
    if op == "import":
        from safetensors.torch import load_file

        source = open_hf(load, HUB_TYPES)
        files = sorted(set(source.tensors.where.values()))
        whole = {name: t for f in files for name, t in load_file(str(f)).items()}
        source.tensors = InMemory(whole)
        return ImportJob(source, opts, 1), whole
    import torch.distributed.checkpoint as dcp

    job = ReshardJob(load, opts, 1)
    whole = {key: torch.empty(info.shape, dtype=info.dtype) for key, info in job.ckpt.tensors.items()}
    dcp.load(whole, checkpoint_id=str(job.ckpt.path))
    job.reader = InMemoryReader(whole)
    return job, whole


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--op", choices=["import", "reshard"], required=True)
    parser.add_argument("--load", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int)
    opts = parser.parse_args()
    from megatron.core import dist_checkpointing

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    warm_imports()
    rss_before = current_rss()
    out = Path(opts.save)
    out.mkdir(parents=True, exist_ok=True)
    before, start = io_counters(), time.perf_counter()
    job, whole = load_whole(opts.op, opts.load, MegatronOptions(save=out, tp=opts.tp, pp=opts.pp, ep=opts.ep, etp=opts.etp,
                                                                         overwrite=True))
    state = {f"t{n}": sharded_tensor(u.outputs[0].place, u.dtype) for n, u in enumerate(job.plan.units)}
    for n, unit in enumerate(job.plan.units):
        (data,) = assemble(unit, job.reader.read(unit.reads, unit.dtype), unit.dtype)
        state[f"t{n}"].data = data.reshape(state[f"t{n}"].local_shape)
    state.update({f"x{n}": extra_state_object(e) for n, e in enumerate(job.extras)})
    whole.clear()
    del whole
    folder = out / iteration_dir(job.iteration)
    folder.mkdir()
    with stand_ins(no_device_calls()):  # as distconv's sink: megatron-core calls torch.cuda even for CPU tensors
        dist_checkpointing.save({**job.common, **state}, str(folder))
    (out / TRACKER).write_text(str(job.iteration))
    seconds, after = time.perf_counter() - start, io_counters()
    stats = {
        "rank": 0,
        "seconds": seconds,
        "read_bytes": after["read_bytes"] - before["read_bytes"],
        "write_bytes": after["write_bytes"] - before["write_bytes"],
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before": rss_before,
    }
    Path(opts.stats).write_text(json.dumps([stats]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
