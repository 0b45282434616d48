"""A live megatron-core model seen as the torch_dist checkpoint it would save.

Its ``sharded_state_dict()`` carries the same sharding metadata a torch_dist save stores: each
tensor's key, global shape and this rank's box of it, with one main replica per box. So a model
is described as a ``Checkpoint`` whose chunks are held in memory by the ranks that hold them, and
export's plan, families, catalogue and gather apply to it unchanged. Nothing is cached: each read
of the model takes ``sharded_state_dict()`` afresh; nothing here writes into a parameter.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from distconv.engine.plan import Read
from distconv.errors import DistconvError
from distconv.megatron.checkpoint import NON_MODEL_PREFIXES, Checkpoint, Chunk, TensorInfo, overlaps
from distconv.megatron.model import sharded_state_dict

# (key, global shape, dtype name, offsets, sizes): one main replica's box, as ranks exchange them
Box = tuple[str, tuple[int, ...], str, tuple[int, ...], tuple[int, ...]]


def local_boxes(models: list[torch.nn.Module]) -> dict[tuple[str, tuple[int, ...]], tuple[Box, torch.Tensor]]:
    """This rank's main replicas of the model's weights (its VPP chunks together), by (key, offsets):
    their box and their data (a view of the parameter, never written)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

    out: dict[tuple[str, tuple[int, ...]], tuple[Box, torch.Tensor]] = {}
    for model in models:
        state = sharded_state_dict(model)
        apply_factories(state)  # e.g. [gate; up] split in two boxes: views, as a save stores them
        for x in nested_values(state):
            if not isinstance(x, ShardedTensor) or not is_main_replica(x.replica_id):
                continue
            if x.key.startswith(NON_MODEL_PREFIXES) or "._extra_state" in x.key:
                continue
            if x.flattened_range is not None:
                raise DistconvError(f"{x.key}: a flattened (distributed-optimizer) shard is not a model weight")
            sizes = (1,) * x.prepend_axis_num + tuple(x.local_shape)
            box = (x.key, tuple(x.global_shape), str(x.dtype).removeprefix("torch."), tuple(x.global_offset), sizes)
            out[(x.key, box[3])] = (box, x.data.detach())
    return out


def describe_model(boxes: list[list[Box]], args: argparse.Namespace) -> Checkpoint:
    """The model every rank's ``boxes`` make up (rank r's list at position r), as a checkpoint
    saved by those ranks; refuses boxes that disagree on a tensor's shape or dtype."""
    tensors: dict[str, tuple[tuple[int, ...], str, list[Chunk]]] = {}
    for rank, held in enumerate(boxes):
        for key, shape, dtype, offsets, sizes in held:
            seen = tensors.setdefault(key, (shape, dtype, []))
            if seen[:2] != (shape, dtype):
                raise DistconvError(f"the model's ranks disagree on {key}: {list(seen[0])} {seen[1]} vs "
                                    f"{list(shape)} {dtype} on rank {rank}")
            seen[2].append(Chunk(offsets, sizes, "", rank))
    infos = {key: TensorInfo(key, shape, getattr(torch, dtype), tuple(sorted(chunks, key=lambda c: c.offsets)))
             for key, (shape, dtype, chunks) in sorted(tensors.items())}
    return Checkpoint(path=None, iteration="live", format="live megatron-core model", args=args, common={},  # type: ignore[arg-type]
                      tensors=infos, other_bytes=0, writers=len(boxes))


class LiveReader:
    """Boxes of this rank's own part of a live model, each copied out of the parameters (local: no
    collective; every box planned for this rank lies in its memory)."""

    collective = False

    def __init__(self, held: dict[tuple[str, tuple[int, ...]], tuple[Box, torch.Tensor]]) -> None:
        self._chunks: dict[str, list[tuple[Chunk, torch.Tensor]]] = {}
        for (key, _), ((_, _, _, offsets, sizes), data) in held.items():
            self._chunks.setdefault(key, []).append((Chunk(offsets, sizes, "", 0), data))

    def read(self, reads: list[Read], dtype: torch.dtype) -> list[torch.Tensor]:
        out = []
        for read in reads:
            pieces = dict(self._chunks.get(read.key, []))
            box = torch.empty(read.sizes, dtype=dtype)
            covered = 0
            for chunk, src, dst in overlaps(read, tuple(pieces)):
                part = box[dst]
                part.copy_(pieces[chunk].reshape(chunk.sizes)[src])
                covered += part.numel()
            if covered != box.numel():
                raise DistconvError(f"internal: {read.key} at {list(read.offsets)} is not held by this rank")
            out.append(box)
        return out

    def files(self, reads: list[Read]) -> list[str]:
        return []


def live_source(models: list[torch.nn.Module], args: argparse.Namespace, collect: Any) -> tuple[Checkpoint, LiveReader]:
    """Collective (``collect``: every rank's value on every rank): the model described, and a reader
    of this rank's part of it as it is now."""
    held = local_boxes(models)
    boxes = collect(sorted(box for box, _ in held.values()))
    return describe_model(boxes, args), LiveReader(held)


def same_layout(a: Checkpoint, b: Checkpoint) -> bool:
    """Whether two descriptions have the same tensors, shapes, dtypes and boxes on the same ranks."""
    return a.tensors == b.tensors

