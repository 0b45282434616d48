"""Reading torch_dist checkpoints: one reader, collectively through megatron-core or by each rank alone.

A collective read is a dict of ``ShardedTensor``s built from the plan (no model instance, no
transformer-engine), loaded by megatron-core's torch_dist strategy with the DCP metadata
distconv already parsed (``serving_metadata``).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import FileSystem

from distconv.engine.plan import Read
from distconv.errors import DistconvError, user_error
from distconv.megatron.checkpoint import Checkpoint, Chunk, overlaps, read_stored, safe_torch_load


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


# Names under which megatron-core's torch_dist strategy builds its DCP readers: a function in
# 0.13 and later, the classes themselves in 0.12 (and in a few metadata helpers of every
# version). All are looked up in the module when ``load`` runs.
_READER_FACTORIES = ("_get_filesystem_reader", "CachedMetadataFileSystemReader", "FileSystemReader")


@contextlib.contextmanager
def serving_metadata(folder: Path, metadata: Any) -> Iterator[None]:
    """While active, megatron-core's torch_dist loads of ``folder`` use ``metadata`` (parsed by
    distconv with its allow-list) instead of unpickling ``.metadata`` again without one.

    This is also the speed-up of parsing the metadata once (seconds per load on large
    checkpoints). A megatron-core that builds its readers some other way is refused rather than
    left to unpickle the file by itself.
    """
    from megatron.core.dist_checkpointing.strategies import torch as strategy

    names = [n for n in _READER_FACTORIES if hasattr(strategy, n)]
    if not set(names) & set(_READER_FACTORIES[:2]):
        raise DistconvError("this megatron-core builds its checkpoint readers in a way distconv does not know, so it "
                            "cannot make it use the allow-listed metadata; use megatron-core 0.12 to 0.19")
    reader = _KnownMetadataReader(folder, metadata)
    originals = {n: getattr(strategy, n) for n in names}

    def factory(name: str):
        def make(checkpoint_dir: Any, *args: Any, **kwargs: Any) -> FileSystemReader:
            if Path(checkpoint_dir) == folder:
                return reader
            return originals[name](checkpoint_dir, *args, **kwargs)
        return make

    for n in names:
        setattr(strategy, n, factory(n))
    try:
        yield
    finally:
        for n, original in originals.items():
            setattr(strategy, n, original)


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


class TorchDistReader:
    """Boxes of one torch_dist folder, read in one of two modes.

    ``collective``: through megatron-core's torch_dist strategy (``load``, a collective over the
    default process group: every rank calls it once per batch, with an empty request when it owns
    nothing there); it reads only the requested chunks (no ``common.pt``).

    Local: by this rank alone, with no collective (a sink that asks for each chunk when its writer
    reaches it, on each rank at its own pace, cannot take part in a collective ``load``). The
    stored chunks a box overlaps are read by byte range, as DCP's own reader does (each chunk is
    one ``torch.save``'d tensor, unpickled with ``weights_only`` and distconv's allow-list), and
    the last chunk is kept for the next box cut from it.
    """

    def __init__(self, ckpt: Checkpoint, collective: bool) -> None:
        self.ckpt, self.collective = ckpt, collective
        self._last: tuple[tuple[str, tuple[int, ...]], torch.Tensor] | None = None

    def read(self, reads: list[Read], dtype: torch.dtype) -> list[torch.Tensor]:
        """``reads`` (this rank's part of one batch) as CPU tensors of ``dtype``."""
        return self._load(reads, dtype) if self.collective else [self._cut(read, dtype) for read in reads]

    def files(self, reads: list[Read]) -> list[str]:
        return sorted({c.file for r in reads for c, _, _ in overlaps(r, self.ckpt.tensors[r.key].chunks_near(r))})

    def _load(self, reads: list[Read], dtype: torch.dtype) -> list[torch.Tensor]:
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

        folder = self.ckpt.path
        request = {f"r{i}": _sharded_tensor(r, dtype) for i, r in enumerate(reads)}
        try:
            with serving_metadata(folder, self.ckpt.metadata):
                loaded = TorchDistLoadShardedStrategy().load(request, folder)
        except BaseException as e:  # torch's CheckpointException derives from BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise user_error(e, f"reading {folder}") from e
        return [loaded[f"r{i}"].reshape(r.sizes) for i, r in enumerate(reads)]

    def _cut(self, read: Read, dtype: torch.dtype) -> torch.Tensor:
        pieces = list(overlaps(read, self.ckpt.tensors[read.key].chunks_near(read)))
        if (len(pieces) == 1 and (tuple(pieces[0][0].offsets), tuple(pieces[0][0].sizes)) == (tuple(read.offsets), tuple(read.sizes))
                and not pieces[0][0].source_offsets):
            whole = self._chunk(read.key, pieces[0][0])  # the box is one stored chunk: no copy
            self._last = None  # the caller may change it in place
            return whole.to(dtype)
        box = torch.empty(read.sizes, dtype=dtype)
        for chunk, src, dst in pieces:
            box[dst] = self._chunk(read.key, chunk)[src]
        return box

    def _chunk(self, key: str, chunk: Chunk) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        if self._last is not None and self._last[0] == (key, chunk.offsets):
            return self._last[1]
        self._last = None
        stored, offsets = chunk.source or key, chunk.stored_offsets or chunk.offsets  # a plain DCP key's own
        info = self.ckpt.metadata.storage_data.get(MetadataIndex(stored, torch.Size(offsets)))
        if info is None:
            raise DistconvError(f"{self.ckpt.path}/.metadata names no data for {stored} at {offsets}")
        data = read_stored(self.ckpt.path, info, key, random_access=True)
        tensor = safe_torch_load(io.BytesIO(data), f"{self.ckpt.path / info.relative_path} ({key})")
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(chunk.sizes):
            raise DistconvError(f"{self.ckpt.path / info.relative_path}: {key} at {chunk.offsets} is not a tensor of shape {chunk.sizes}")
        self._last = ((key, chunk.offsets), tensor)
        return tensor
