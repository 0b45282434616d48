"""Megatron checkpoints as sources: find the iteration folder, describe it and read it, whatever its
format; the training's model-parallel size, which launchers use as the default process count."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from distconv.errors import DistconvError
from distconv.megatron.args import parallel_sizes
from distconv.megatron.checkpoint import (
    Checkpoint,
    check_files,
    detect_format,
    load_common_state,
    locate,
    read_dcp_metadata,
    read_tensor_index,
)
from distconv.megatron.legacy import LegacyReader, describe_legacy
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
