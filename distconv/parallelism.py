"""The training's model-parallel size, which launchers use as the default process count."""

from __future__ import annotations

import math
from pathlib import Path

from distconv.sources.checkpoint import detect_format, load_common_state, locate
from distconv.sources.megatron import describe
from distconv.errors import DistconvError
from distconv.spec import arg


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
    tp, pp, ep = (int(arg(args, name, default=1) or 1) for name in
                  ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"))
    etp = int(arg(args, "expert_tensor_parallel_size", default=None) or tp)
    return pp * math.lcm(tp, ep * etp)
