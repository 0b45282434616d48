"""Write a Megatron-LM torch_dist save root with megatron-core ``dist_checkpointing.save``.

Shared by ``import`` and ``reshard``. Every rank passes the chunks it owns as ``ShardedTensor``s
(exactly one rank holds each chunk, so all are main replicas) plus the ``_extra_state`` objects;
rank 0's non-tensor entries (``args``, ``iteration``, ...) become ``common.pt``. The save goes
into a hidden sibling of ``--save`` that is renamed into place only after the tracker file is
written, so a failed run leaves no complete-looking root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distconv.checkpoint import TRACKER
from distconv.errors import DistconvError
from distconv.gather import Comm
from distconv.layout import ExtraState, Shard
from distconv.megatron_model import no_device_calls, stand_ins
from distconv.write import OutputFolder


def sharded_tensor(shard: Shard, data: torch.Tensor):
    """The ``ShardedTensor`` for one owned chunk (layer axis kept as a leading dim of 1)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    lead = len(shard.global_shape) - len(shard.sizes)
    local = (1,) * lead + shard.sizes
    return ShardedTensor(
        key=shard.key,
        data=data.reshape(local),
        dtype=data.dtype,
        local_shape=local,
        global_shape=shard.global_shape,
        global_offset=shard.offsets,
        axis_fragmentations=shard.fragments,
        replica_id=0,
    )


def extra_state_object(extra: ExtraState):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(extra.key, None, (extra.num_layers,), (extra.layer,), replica_id=0)


def iteration_dir(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


class MegatronRoot:
    """A save root created atomically by all ranks together (collective methods)."""

    def __init__(self, comm: Comm, save: str | Path, overwrite: bool, sources: tuple[str | Path | None, ...]) -> None:
        self.comm = comm
        self.folder = OutputFolder(save, overwrite, sources) if comm.rank == 0 else None

    def save(self, state: dict[str, Any], common: dict[str, Any], iteration: int | str) -> None:
        """Create the temporary root, ``dist_checkpointing.save`` into it, write the tracker."""
        from megatron.core import dist_checkpointing

        tmp = [str(self.folder.create()) if self.folder is not None else None]
        if self.comm.world > 1:
            dist.broadcast_object_list(tmp, src=0, group=self.comm.control)
        ckpt = Path(tmp[0]) / iteration_dir(iteration)
        if self.comm.rank == 0:
            ckpt.mkdir()
        if self.comm.world > 1:
            dist.barrier(group=self.comm.control)
        # gathering over gloo: keep the save off the GPU (no CUDA context on device 0 per rank,
        # which exclusive-process mode refuses; without CUDA the calls would fail)
        with stand_ins(no_device_calls() if self.comm.device.type == "cpu" else []):
            dist_checkpointing.save({**common, **state}, str(ckpt))
        if self.comm.rank == 0:
            (Path(tmp[0]) / TRACKER).write_text(str(iteration))

    def commit(self) -> None:
        if self.folder is not None:
            self.folder.commit()

    def abort(self) -> None:
        if self.folder is not None:
            self.folder.abort()


def save_and_commit(comm: Comm, root: MegatronRoot, state: dict, common: dict, iteration: int | str) -> None:
    """Collective: save, agree on the outcome, then rank 0 renames the root into place."""
    error = None
    try:
        try:
            root.save(state, common, iteration)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            error = DistconvError(f"writing the Megatron checkpoint failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
        comm.agree(error)
        if comm.rank == 0:
            root.commit()
    except BaseException:
        root.abort()
        raise
