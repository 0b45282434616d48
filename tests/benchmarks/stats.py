"""What the benchmarks measure in their own processes: storage I/O, resident memory, warm imports."""

from __future__ import annotations

import importlib
import os


def io_counters() -> dict[str, int]:
    """This process's ``/proc/self/io``: read_bytes/write_bytes count real storage I/O."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def current_rss() -> int:
    """This process's resident set size now (``/proc/self/statm``), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def warm_imports() -> None:
    """Import what every conversion loads, so that ``rss_before`` is the same runtime in each script."""
    for module in ("megatron.core.dist_checkpointing", "safetensors.torch", "torch.distributed.checkpoint", "transformers"):
        importlib.import_module(module)
