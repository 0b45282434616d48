"""The gloo group both sides of ``distconv_gloo`` join: plain torch, no vLLM, no pickle."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

# what a weight update may carry: floating dtypes only, named as torch names them
DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16", "float8_e4m3fn")}


def gloo_group(host: str, port: int, rank: int, world: int, timeout_s: float) -> dist.ProcessGroup:
    """A gloo group outside ``torch.distributed``'s default one: rank 0 (the trainer's first sender)
    serves its store at ``host:port``; the other senders follow, then vLLM's workers."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    return dist.ProcessGroupGloo(dist.PrefixStore("distconv_gloo", store), rank, world, timeout)

