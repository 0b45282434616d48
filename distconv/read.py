"""Stage 3: each rank loads its planned slices with megatron-core ``dist_checkpointing.load``.

(Legacy ``mp_rank_*`` checkpoints are read by ``distconv.legacy.read_legacy`` instead: each
rank opens only the rank files its reads name.)

The request is a dict of ``ShardedTensor``s built from the plan (no model instance, no
transformer-engine). ``load`` is collective over the default process group, so every rank
calls it once per group, with an empty request when it owns nothing there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distconv.checkpoint import Checkpoint, safe_globals
from distconv.errors import DistconvError
from distconv.plan import Read


def _sharded_tensor(read: Read, dtype: torch.dtype, device: torch.device):
    from megatron.core.dist_checkpointing import ShardedTensor

    regular = all(o % s == 0 and g % s == 0 for o, s, g in zip(read.offsets, read.sizes, read.global_shape))
    fragments = tuple(g // s for g, s in zip(read.global_shape, read.sizes)) if regular else None
    return ShardedTensor(
        key=read.key,
        data=torch.empty(read.sizes, dtype=dtype, device=device),
        dtype=dtype,
        local_shape=read.sizes,
        global_shape=read.global_shape,
        global_offset=read.offsets,
        axis_fragmentations=fragments,
    )


def read_slices(ckpt: Checkpoint, reads: list[Read], dtype: torch.dtype) -> list[torch.Tensor]:
    """Load ``reads`` (this rank's part of one group) as tensors of ``dtype`` on CPU.

    Collective for torch_dist (every rank calls it once per group); local for legacy.
    """
    if ckpt.format == "legacy":
        from distconv.legacy import read_legacy

        return read_legacy(ckpt, reads, dtype)
    return _read_dist(ckpt.path, reads, dtype)


def _read_dist(folder: Path, reads: list[Read], dtype: torch.dtype) -> list[torch.Tensor]:
    from megatron.core import dist_checkpointing

    request = {f"r{i}": _sharded_tensor(r, dtype, torch.device("cpu")) for i, r in enumerate(reads)}
    try:
        with torch.serialization.safe_globals(safe_globals()):  # load() re-reads common.pt
            loaded = dist_checkpointing.load(request, str(folder), validate_access_integrity=False)
    except BaseException as e:  # torch's CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise DistconvError(f"reading {folder} failed: {_first_line(e)}") from e
    return [loaded[f"r{i}"].reshape(r.sizes) for i, r in enumerate(reads)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    # DCP wraps per-rank failures; the innermost line names the real cause
    causes = [l for l in lines if "Error" in l or "error" in l]
    return causes[-1] if causes else lines[0]
