"""The Megatron torch_dist sink: a save root megatron-core loads, written chunk by chunk.

megatron-core's ``dist_checkpointing.save`` does the bookkeeping: it checks the chunks of all
ranks against each other and writes ``common.pt`` and ``metadata.json``. The tensor chunks go
through a save strategy of ours: PyTorch DCP's ``FileSystemWriter`` driven by a planner whose
``resolve_data`` asks the engine for a chunk's data only when the writer reaches it.
megatron-core's own strategy stages every tensor of the rank in memory first; here a rank holds
one chunk at a time (the chunk being written, plus what the source's reader keeps), however
large the model. Every rank passes the chunks it owns (each chunk is owned by one rank, so all
are main replicas) plus the ``_extra_state`` objects; the ``.metadata`` is the one DCP makes
from those chunks, as in megatron-core's save.

The root is built in the run's temporary folder (``distconv.engine.folder``); the tracker file
is written last, so a root without it is never taken for a finished save.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from distconv.engine.marker import HashedWrites
from distconv.errors import user_error
from distconv.megatron.catalogue import ExtraState, Shard
from distconv.megatron.checkpoint import TRACKER, iteration_dir, read_dcp_metadata, tracker_iteration
from distconv.megatron.model import no_device_calls, stand_ins

# (key, global offsets) of one chunk -> its data, read when the writer reaches it
Fetch = Callable[[str, tuple[int, ...]], torch.Tensor]


def sharded_tensor(shard: Shard, dtype: torch.dtype):
    """The ``ShardedTensor`` of one owned chunk, without data (the layer axis kept as a leading 1)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    lead = len(shard.global_shape) - len(shard.sizes)
    local = (1,) * lead + shard.sizes
    return ShardedTensor(
        key=shard.key,
        data=torch.empty(local, dtype=dtype, device="meta"),
        dtype=dtype,
        local_shape=local,
        global_shape=shard.global_shape,
        global_offset=shard.offsets,
        axis_fragmentations=shard.fragments,
        replica_id=0,
    )


def extra_state_object(extra: ExtraState):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(extra.key, None, extra.global_shape, extra.offsets, replica_id=0)


class _HashedStream:
    """A file DCP writes into, hashed as written (``HashedWrites``); everything else is the file's."""

    def __init__(self, stream: Any, writes: HashedWrites) -> None:
        self._stream, self._writes = stream, writes
        self.sha, self.size = hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        n = self._writes.write(self._stream, self.sha, data)
        self.size += memoryview(data).nbytes
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _hashing_file_system(writes: HashedWrites):
    """DCP's file system, whose files are hashed as written into ``writes.sums`` (by file name).
    DCP writes each file once, front to back (``tell`` only reads the position)."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
            with super().create_stream(path, mode) as stream:
                if mode != "wb":
                    yield stream
                    return
                hashed = _HashedStream(stream, writes)
                yield hashed
            writes.sums[Path(path).name] = {"bytes": hashed.size, "sha256": hashed.sha.hexdigest()}

    return HashingFileSystem()


def _strategy(fetch: Fetch, group: Any, writes: HashedWrites):
    """megatron-core's torch_dist save strategy, writing through DCP's lazy ``FileSystemWriter``."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item: Any) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            data = fetch(write_item.index.fqn, tuple(write_item.index.offset))
            return data.reshape(tuple(write_item.tensor_data.chunk.sizes))

    class LazyStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
            by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            state = mcore_to_pyt_state_dict(by_key, False)
            writer = FileSystemWriter(str(checkpoint_dir), thread_count=1)
            writer.fs = _hashing_file_system(writes)
            dcp_save(state, storage_writer=writer, planner=LazyPlanner(flatten_state_dict=False), process_group=group)

    return LazyStrategy("torch_dist", 1)


def save_root(comm: Any, tmp: Path, *, chunks: list[tuple[Shard, torch.dtype]], extras: list[ExtraState],
              fetch: Fetch, common: dict[str, Any], iteration: int | str) -> dict[str, dict[str, Any]]:
    """Collective: write ``tmp/<iteration folder>`` with this rank's ``chunks`` (each with its stored
    dtype) and ``extras``, then (rank 0) the tracker file. ``fetch`` supplies each chunk's data as
    the writer reaches it. Returns this rank's DCP data files (``__R_N.distcp``, under the
    iteration folder) with their sizes and SHA-256, hashed as they were written."""
    from megatron.core import dist_checkpointing

    ckpt = tmp / iteration_dir(iteration)
    if comm.rank == 0:
        ckpt.mkdir()
    if comm.world > 1:
        dist.barrier(group=comm.control)
    state: dict[str, Any] = {f"t{n}": sharded_tensor(s, dtype) for n, (s, dtype) in enumerate(chunks)}
    state.update({f"x{n}": extra_state_object(e) for n, e in enumerate(extras)})
    writes = HashedWrites()
    try:
        # keep the save off the GPU: no CUDA context on device 0 per rank (exclusive-process
        # mode refuses it), and without CUDA the calls would fail
        with stand_ins(no_device_calls()):
            dist_checkpointing.save({**common, **state}, str(ckpt), sharded_strategy=_strategy(fetch, comm.control, writes))
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise user_error(e, f"writing the Megatron checkpoint into {ckpt}", writing=ckpt) from e
    finally:
        writes.close()
    if comm.rank == 0:
        (tmp / TRACKER).write_text(str(iteration))
    folder = iteration_dir(iteration)
    return {f"{folder}/{name}": sums for name, sums in writes.sums.items() if name.endswith(".distcp")}


def complete(folder: Path, names: set[str]) -> bool:
    """``names`` (the files of a save root) hold what the format needs: the tracker, and in the
    iteration folder it names ``metadata.json``, ``.metadata`` and every data file ``.metadata``
    names (read through the allow-listed unpickler)."""
    if TRACKER not in names:
        return False
    tracker = folder / TRACKER
    iteration = iteration_dir(tracker_iteration(tracker, tracker.read_text()))
    needed = {"metadata.json", ".metadata"} | {
        info.relative_path for info in read_dcp_metadata(folder / iteration).storage_data.values()}
    return all(f"{iteration}/{n}" in names for n in needed)
