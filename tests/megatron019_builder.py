"""distconv's model builder (``verify``'s megatron-core side) with megatron-core 0.19.2 installed.

Run with the 0.19.2 venv's python and this project on its path (``tests/test_megatron019.py``):

    python tests/megatron019_builder.py BUILT RESULT NAME ...

For each fixture NAME of ``BUILT`` (saved by megatron-core 0.16.1): distconv's ``build_gpt`` of the
checkpoint's args (as ``distconv verify`` builds it, its stand-ins included) under 0.19.2, its
weights loaded from the TP1 PP1 save with 0.19.2's ``dist_checkpointing.load``, and its forward
on the fixture's tokens. Writes ``{name: max |logits - 0.16.1's recorded logits|}`` (or the error)
as JSON to RESULT.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def max_diff(built: Path, name: str) -> float:
    from megatron.core import dist_checkpointing, parallel_state

    from distconv.megatron.model import build_gpt, cpu_compat, forward_logits, sharded_state_dict
    from distconv.megatron.source import describe

    root = built / name / "tp1pp1"
    args = describe(root, None).args
    ref = torch.load(built / "refs" / f"{name}.pt")
    folder = next(p for p in root.iterdir() if p.name.startswith("iter_"))
    with cpu_compat():
        parallel_state.initialize_model_parallel(1, 1)
        try:
            model = build_gpt(args, 1, 1, init=False)
            # the fixture's common.pt holds its args (a Namespace); 0.19.2 unpickles it with weights_only
            with torch.serialization.safe_globals([argparse.Namespace]):
                loaded = dist_checkpointing.load({"model": sharded_state_dict(model)}, str(folder))
            model.load_state_dict(loaded["model"])
            with torch.no_grad():
                logits = forward_logits(model.eval(), ref["tokens"]).float()
        finally:
            parallel_state.destroy_model_parallel()
    vocab = ref["logits"].shape[-1]
    return (logits[..., :vocab] - ref["logits"]).abs().max().item()


def main() -> None:
    built, result, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    out = {}
    for name in names:
        try:
            out[name] = {"diff": max_diff(built, name)}
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    result.write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
