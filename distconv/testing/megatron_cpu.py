"""Small megatron-core models for the test fixtures and benchmarks (CPU, gloo).

The model itself is built by ``distconv.megatron_model`` (what ``distconv verify`` uses too);
here are only the test-side helpers: args for a small model and reproducible random weights.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

from distconv.megatron_model import with_defaults


def megatron_args(**overrides: Any) -> argparse.Namespace:
    """Megatron-LM training arguments (0.16 names) for a small Llama-style model."""
    return with_defaults(argparse.Namespace(**overrides))


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, bf16_exact: bool = False) -> None:
    """Give every parameter (norms and biases too) distinct random values, reproducibly. MTP layers
    come last: a model with them has the same other weights as the model without."""
    gen = torch.Generator().manual_seed(seed)
    for mtp in (False, True):
        for name, p in sorted(model.named_parameters()):
            if name.startswith("mtp.") != mtp:
                continue
            if "norm" in name and name.endswith("weight"):
                value = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
            else:
                value = 0.05 * torch.randn(p.shape, generator=gen)
            if bf16_exact:  # values a bf16 checkpoint represents exactly
                value = value.to(torch.bfloat16).float()
            p.copy_(value)
        for name, b in sorted(model.named_buffers()):
            if name.endswith("expert_bias") and name.startswith("mtp.") == mtp:  # the router's selection bias
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


@contextlib.contextmanager
def model_parallel(tp: int, pp: int, **sizes: int) -> Iterator[None]:
    """megatron-core's model-parallel state at TP x PP (x EP ...) for the block, torn down after it.

    ``destroy_model_parallel`` only forgets its process groups; their gloo threads live on (some
    polling), and a process that sets up many layouts piles up thousands. The groups made here
    are destroyed on exit.
    """
    from megatron.core import parallel_state

    made: list = []
    original = dist.new_group

    def recording(*args: Any, **kwargs: Any):
        group = original(*args, **kwargs)
        made.append(group)
        return group

    parallel_state.destroy_model_parallel()
    dist.new_group = recording
    try:
        parallel_state.initialize_model_parallel(tp, pp, **sizes)
    finally:
        dist.new_group = original
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        for group in {id(g): g for g in made}.values():
            if group is None or group == dist.GroupMember.NON_GROUP_MEMBER or group == dist.GroupMember.WORLD:
                continue
            try:
                dist.destroy_process_group(group)
            except ValueError:  # not a live group of this process (megatron-core handed it out twice)
                pass
