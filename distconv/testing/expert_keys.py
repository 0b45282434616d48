"""Re-save a grouped-expert checkpoint with the per-expert key spellings of other versions.

megatron-core 0.16 saves every expert of a layer under one key with an expert axis
(``decoder.layers.mlp.experts.experts.linear_fc1.weight`` [L, E, ...]). Checkpoints from other
versions and formats spell experts one key each; this writes the same weights that way, with
real ``dist_checkpointing.save`` calls and the experts spread over the ranks as writers:

- ``sequential``: ``decoder.layers.mlp.experts.local_experts.{e}.linear_fc1.weight`` [L, ...]
- ``grouped_gemm``: ``decoder.layers.mlp.experts.linear_fc1.weight{e}`` [L, ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

GROUPED = ".experts.experts."
FORMS: dict[str, Callable[[str, int], str]] = {
    "sequential": lambda key, e: key.replace(GROUPED, f".experts.local_experts.{e}."),
    "grouped_gemm": lambda key, e: key.replace(GROUPED, ".experts.") + str(e),
}


def save_expert_key_form(src: Path, root: Path, args: argparse.Namespace, form: str) -> None:
    """Read ``src`` (an iteration folder) whole, write it to ``root/release`` with ``form`` keys."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    meta = dist_checkpointing.load_tensors_metadata(str(src))
    request = {k: v.without_data() for k, v in meta.items() if not k.startswith("optimizer.")}
    full = dist_checkpointing.load(request, str(src), validate_access_integrity=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    tensors: list[tuple[str, torch.Tensor]] = []
    for key in sorted(request):
        t = full[key]
        if GROUPED in key:
            tensors += [(FORMS[form](key, e), t[:, e].contiguous()) for e in range(t.shape[1])]
        else:
            tensors.append((key, t))
    mine = {k: ShardedTensor.from_rank_offsets(k, t) for i, (k, t) in enumerate(tensors) if i % world == rank}
    ckpt = root / "release"
    if rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save({"model": mine, "args": args, "checkpoint_version": 3.0, "iteration": 0}, str(ckpt))
    dist.barrier()
    if rank == 0:
        (root / "latest_checkpointed_iteration.txt").write_text("release")
    dist.barrier()
