"""Megatron checkpoints as sources: find the iteration folder, describe it and read it, whatever its
format, and name every file a run reads from it; the training's model-parallel size, which
launchers use as the default process count, and the bounds the files themselves set on it where
the processes run on CPUs."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from distconv.errors import DistconvError
from distconv.megatron.args import parallel_sizes
from distconv.megatron.checkpoint import (
    TRACKER,
    Checkpoint,
    check_files,
    detect_format,
    load_common_state,
    locate,
    read_dcp_metadata,
    read_tensor_index,
)
from distconv.megatron.legacy import LegacyReader, describe_legacy, rank_files
from distconv.megatron.torch_dist import TorchDistReader


def describe(load: str | Path, iteration: int | str | None = None) -> Checkpoint:
    """Stage 1: everything the plan needs, from metadata alone."""
    folder, iteration = locate(load, iteration)
    fmt = detect_format(folder)
    if fmt == "legacy":
        return describe_legacy(folder, iteration)
    metadata = read_dcp_metadata(folder)
    check_files(folder, metadata)
    common = load_common_state(folder, metadata)
    args = common.get("args")
    if not isinstance(args, argparse.Namespace):
        raise DistconvError(f"{folder}: the common state has no Megatron-LM 'args'; pass a checkpoint saved by Megatron-LM")
    tensors, other = read_tensor_index(folder, metadata)
    if not tensors:
        raise DistconvError(f"{folder} holds no model tensors")
    writers = 1 + max((c.writer for t in tensors.values() for c in t.chunks), default=0)
    return Checkpoint(folder, iteration, fmt, args, common, tensors, other, writers, metadata)


def read_files(load: str | Path, ckpt: Checkpoint) -> list[Path]:
    """Every file a run reads from the checkpoint at ``load``: the tracker, the metadata and every data
    file (any of them may be a link: ``refuse_overlap`` follows each to what it names)."""
    folder = Path(ckpt.path)
    if folder.is_file():  # a zipped legacy release
        return [folder]
    if ckpt.format == "legacy":
        names = set(rank_files(folder).values())
    else:
        names = {".metadata", "metadata.json", "common.pt"} | {info.relative_path for info in ckpt.metadata.storage_data.values()}
    trackers = {Path(load) / TRACKER, folder.parent / TRACKER}
    return sorted(t for t in trackers if t.exists()) + [folder / name for name in sorted(names)]


def open_reader(ckpt: Checkpoint, collective: bool) -> LegacyReader | TorchDistReader:
    """The reader of a described checkpoint: a legacy one's rank files are always read locally; a
    torch_dist one's through megatron-core's collective load, or by each rank alone."""
    return LegacyReader(ckpt) if ckpt.format == "legacy" else TorchDistReader(ckpt, collective)


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
    tp, pp, ep, etp = parallel_sizes(args)
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
