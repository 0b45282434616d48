"""Stage 3: each rank loads its planned slices with megatron-core ``dist_checkpointing.load``.

The request is a dict of ``ShardedTensor``s built from the plan (no model instance, no
transformer-engine). ``load`` is collective over the default process group, so every rank
calls it once per read batch, with an empty request when it owns nothing there.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import FileSystem

from distconv.checkpoint import safe_globals
from distconv.errors import DistconvError
from distconv.plan import Read


class _RandomAccessFileSystem(FileSystem):
    """Local files opened with ``POSIX_FADV_RANDOM``: DCP reads exact byte ranges, so kernel
    read-ahead would only pull in the optimizer state stored next to the weights."""

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as stream:
            if "r" in mode and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            yield stream


class _KnownMetadataReader(FileSystemReader):
    """A DCP reader that serves the metadata distconv already parsed (with its allow-list)."""

    def __init__(self, path: Path, metadata: Any) -> None:
        super().__init__(str(path))
        self._known = metadata
        if type(self.fs) is FileSystem:
            self.fs = _RandomAccessFileSystem()

    def read_metadata(self) -> Any:
        return self._known


@contextlib.contextmanager
def _metadata_parsed_once(folder: Path, metadata: Any) -> Iterator[None]:
    """Let megatron-core's torch_dist strategy reuse ``metadata`` instead of re-unpickling
    ``.metadata`` on every ``load`` call (seconds per call on large checkpoints).

    Applies where megatron-core builds its reader through ``_get_filesystem_reader``
    (0.14-0.16); elsewhere ``load`` simply reads the metadata itself.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import torch as strategy
    except ImportError:
        yield
        return
    original = getattr(strategy, "_get_filesystem_reader", None)
    if metadata is None or original is None:
        yield
        return
    reader = _KnownMetadataReader(folder, metadata)

    def get_reader(checkpoint_dir: Any, cache_metadata: bool = False) -> FileSystemReader:
        return reader if Path(checkpoint_dir) == folder else original(checkpoint_dir, cache_metadata)

    strategy._get_filesystem_reader = get_reader
    try:
        yield
    finally:
        strategy._get_filesystem_reader = original


def _sharded_tensor(read: Read, dtype: torch.dtype):
    from megatron.core.dist_checkpointing import ShardedTensor

    regular = all(o % s == 0 and g % s == 0 for o, s, g in zip(read.offsets, read.sizes, read.global_shape))
    fragments = tuple(g // s for g, s in zip(read.global_shape, read.sizes)) if regular else None
    return ShardedTensor(
        key=read.key,
        data=torch.empty(read.sizes, dtype=dtype),
        dtype=dtype,
        local_shape=read.sizes,
        global_shape=read.global_shape,
        global_offset=read.offsets,
        axis_fragmentations=fragments,
    )


class Reader:
    """Loads planned slices of one checkpoint folder."""

    def __init__(self, folder: Path, metadata: Any = None) -> None:
        self.folder = Path(folder)
        self.metadata = metadata

    def read(self, reads: list[Read], dtype: torch.dtype) -> list[torch.Tensor]:
        """Load ``reads`` (this rank's part of one batch) as CPU tensors of ``dtype``."""
        from megatron.core import dist_checkpointing

        request = {f"r{i}": _sharded_tensor(r, dtype) for i, r in enumerate(reads)}
        try:
            # load() re-reads common.pt (allow-list) and, unless cached, .metadata
            with torch.serialization.safe_globals(safe_globals()), _metadata_parsed_once(self.folder, self.metadata):
                loaded = dist_checkpointing.load(request, str(self.folder), validate_access_integrity=False)
        except BaseException as e:  # torch's CheckpointException derives from BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise DistconvError(f"reading {self.folder} failed: {_first_line(e)}") from e
        return [loaded[f"r{i}"].reshape(r.sizes) for i, r in enumerate(reads)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    # DCP wraps per-rank failures; the innermost line names the real cause
    causes = [l for l in lines if "Error" in l or "error" in l]
    return causes[-1] if causes else lines[0]
