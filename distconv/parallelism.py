"""The training's model-parallel size, which launchers use as the default process count, and the
bounds the files themselves set on it where the processes run on CPUs."""

from __future__ import annotations

import math
import os
from pathlib import Path

from distconv.sources.checkpoint import detect_format, load_common_state, locate, read_dcp_metadata, read_tensor_index
from distconv.sources.legacy import rank_files
from distconv.sources.megatron import describe
from distconv.errors import DistconvError
from distconv.spec import arg


def model_parallel_size(load: str | Path, iteration: int | str | None = None) -> int:
    """PP x lcm(TP, EP x ETP) from the checkpoint's args (the common state only, allow-listed):
    the fewest ranks that hold distinct slices, as Megatron-LM lays out dense and expert groups
    over the same ranks (expert TP defaults to TP)."""
    folder, iteration = locate(load, iteration)
    if detect_format(folder) == "legacy":
        args = describe(folder, iteration).args
    else:
        args = load_common_state(folder).get("args")
    if args is None:
        raise DistconvError(f"{folder}: the common state has no Megatron-LM 'args'")
    tp, pp, ep = (int(arg(args, name, default=1) or 1) for name in
                  ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"))
    etp = int(arg(args, "expert_tensor_parallel_size", default=None) or tp)
    return pp * math.lcm(tp, ep * etp)


def writer_count(load: str | Path, iteration: int | str | None = None) -> int:
    """How many distinct ranks wrote the checkpoint's model tensors (from the allow-listed DCP
    metadata's file names, or the legacy rank files): unlike args, a count the files vouch for."""
    folder, _ = locate(load, iteration)
    if detect_format(folder) == "legacy":
        return len(rank_files(folder))
    tensors, _ = read_tensor_index(folder, read_dcp_metadata(folder))
    return len({c.writer for t in tensors.values() for c in t.chunks}) or 1


def processes_per_node(load: str | Path, nodes: int, cpu: bool) -> int:
    """The launchers' default process count per node: the model-parallel size over ``nodes``; on
    CPUs (``cpu``) at most the checkpoint's writer count in all and this node's usable cores."""
    size = model_parallel_size(load)
    if cpu:
        size = min(size, writer_count(load))
    per_node = -(-size // max(1, nodes))
    return min(per_node, len(os.sched_getaffinity(0))) if cpu else per_node
