"""Megatron checkpoints as sources: find the iteration folder and describe it, whatever its format."""

from __future__ import annotations

import argparse
from pathlib import Path

from distconv.errors import DistconvError
from distconv.sources.checkpoint import (
    TRACKER,
    Checkpoint,
    check_files,
    detect_format,
    load_common_state,
    locate,
    read_dcp_metadata,
    read_tensor_index,
)
from distconv.sources.legacy import describe_legacy, rank_files


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
