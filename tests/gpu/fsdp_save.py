"""An ``fsdp_dtensor`` save written by Megatron-FSDP itself (the GPU check's stage 6; needs CUDA).

Megatron-FSDP does not run on a CPU, so the test suite's ``fsdp_dtensor`` fixtures
(``tests/fixtures/fsdp_dtensor.py``) are written with torch's DCP and DTensor, laid out as
Megatron-FSDP lays them out. This script writes the same fixture models with Megatron-FSDP
itself, the way Megatron-LM's ``save_checkpoint`` does for ``--ckpt-format fsdp_dtensor``:

- the fixture's ``GPTModel`` (TP1 PP1, its reference weights from the fixture's torch_dist save)
  on this rank's GPU, wrapped in megatron-core's ``FullyShardedDataParallel`` with
  ``use_megatron_fsdp`` and the ``optim_grads_params`` sharding over data parallelism (every rank);
- the wrapper's ``state_dict()``, then megatron-core's own handlers in the order of Megatron-LM's
  ``preprocess_fsdp_dtensor_state_dict``: ``handle_fp8_extra_state_case``,
  ``handle_swiglu_in_state_dict`` (SwiGLU models), ``handle_experts_in_state_dict`` (MoE) and
  ``preprocess_state_dict_for_uneven_dtensor``;
- args, iteration and checkpoint version beside it, one ``torch.distributed.checkpoint.save``,
  the tracker written last (``tests.fixtures.fsdp_dtensor.save``).

Run by tests/gpu/check.py: ``torchrun --nproc-per-node N tests/gpu/fsdp_save.py --built DIR --out OUT
--only NAME ...`` (N GPUs, one rank each). Writes ``OUT/NAME_megatron_fsdp``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.fixtures.fsdp_dtensor import reference_model, save
from tests.fixtures.megatron_cpu import model_parallel

def megatron_fsdp_state(model: torch.nn.Module) -> dict:
    """The model state Megatron-LM saves for ``fsdp_dtensor``, from Megatron-FSDP's own wrapper."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.fsdp.mcore_fsdp_adapter import FullyShardedDataParallel
    from megatron.core.transformer.fsdp_dtensor_checkpoint import (
        handle_experts_in_state_dict,
        handle_fp8_extra_state_case,
        handle_swiglu_in_state_dict,
    )
    from megatron.core.distributed.fsdp.src.megatron_fsdp.uneven_dtensor import preprocess_state_dict_for_uneven_dtensor

    config = model.config
    ddp = DistributedDataParallelConfig(use_megatron_fsdp=True, use_distributed_optimizer=True,
                                        data_parallel_sharding_strategy="optim_grads_params")
    wrapped = FullyShardedDataParallel(config, ddp, model.cuda())
    state = wrapped.state_dict()
    handle_fp8_extra_state_case(state)
    if config.gated_linear_unit and config.activation_func is F.silu:
        state, _ = handle_swiglu_in_state_dict(wrapped, state, None)
    if config.num_moe_experts:
        state = handle_experts_in_state_dict(state, config.num_moe_experts)
    preprocess_state_dict_for_uneven_dtensor({"model": state})  # the only DTensors of the save
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--built", required=True, type=Path, help="the fixtures of tests.fixtures.build")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--only", required=True, nargs="+", help="the fixtures to save (of tests.fixtures.build)")
    opts = parser.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("cpu:gloo,cuda:nccl")
    with model_parallel(1, 1):
        for name in opts.only:
            model, args = reference_model(name, opts.built)
            save(opts.out, f"{name}_megatron_fsdp", "fsdp_dtensor", {}, args, megatron_fsdp_state(model))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
