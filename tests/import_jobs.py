"""Run imports, reshards, exports and megatron-core checks in one torchrun launch.

    torchrun --nproc-per-node 4 tests/import_jobs.py JOBS.json RESULTS.json

Ops: ``import`` / ``import_ms`` / ``reshard`` / ``export`` call distconv's Python API inside
this script's process group. ``check`` is the proof for a written checkpoint: megatron-core
builds ``GPTModel`` at the target TP x PP (a model whose args say
``transformer_impl=transformer_engine``: from megatron-core's TE spec, under
``fixtures.te_spec``'s stand-ins) and (1) the chunks its ``sharded_state_dict()`` saves
(main replicas, gathered over all ranks) must equal the chunks stored in the checkpoint's DCP
metadata, (2) ``dist_checkpointing.load`` of that state dict with ``StrictHandling.RAISE_ALL``
must succeed; then (3) the model is built at TP1 PP1, strictly loaded again and its logits (and
its MTP layers', beside them) on the given tokens are saved for the test to compare with transformers'.
``import`` and ``export`` jobs may name a ``wrong_mapping`` (a deliberately broken gpt-oss table).
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import distconv
from distconv.directions.import_ import import_hf, import_mindspore
from distconv.directions.reshard import reshard
from distconv.megatron.model import sharded_state_dict
from distconv.megatron.source import describe

from fixtures.megatron_cpu import model_parallel
from fixtures.te_spec import te_spec_stand_in
from wrong_mapping import wrong_mapping


def model_chunks(model) -> set:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = sharded_state_dict(model)
    apply_factories(sd)
    return {
        (x.key, tuple(x.global_offset), (1,) * x.prepend_axis_num + tuple(x.local_shape))
        for x in nested_values(sd)
        if isinstance(x, ShardedTensor)
        and all(r == 0 for r in (x.replica_id if isinstance(x.replica_id, tuple) else (x.replica_id,)))
    }


@contextlib.contextmanager
def grouped_gemm_stand_in(on: bool):
    """Let megatron-core build its local ``GroupedMLP`` (the ``grouped_gemm`` package is not
    installed here) for its ``sharded_state_dict`` only: its forward pass is never run."""
    from megatron.core.transformer.moe import grouped_gemm_util

    saved = grouped_gemm_util.grouped_gemm
    if on and saved is None:
        grouped_gemm_util.grouped_gemm = object()
    try:
        yield
    finally:
        grouped_gemm_util.grouped_gemm = saved


def build_and_load(folder: Path, args: argparse.Namespace, tp: int, pp: int):
    """megatron-core's GPTModel at TP x PP (x EP x ETP as set up by ``model_parallel``), loaded
    strictly from ``folder`` (call inside ``model_parallel``)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from distconv.megatron.model import build_gpt

    te = getattr(args, "transformer_impl", "local") == "transformer_engine"
    with grouped_gemm_stand_in(bool(getattr(args, "moe_grouped_gemm", False))), \
            te_spec_stand_in() if te else contextlib.nullcontext():
        model = build_gpt(args, tp, pp, transformer_engine=te)
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = dist_checkpointing.load({"model": sharded_state_dict(model)}, str(folder), strict=StrictHandling.RAISE_ALL)
    model.load_state_dict(loaded["model"])
    return model


def check(root: str, tp: int, pp: int, tokens: list, logits_out: str, ep: int = 1, etp: int | None = None) -> dict:
    """Build at the target layout (TP x PP, and EP x ETP for MoE) from the checkpoint's own args;
    the logits come from the model at TP1 PP1 EP1 (sequential experts, whatever the chunking)."""
    from distconv.megatron.model import forward_logits

    ckpt = describe(root)
    args = ckpt.args
    with model_parallel(tp, pp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp):
        model = build_and_load(ckpt.path, args, tp, pp)
        chunks = [None] * dist.get_world_size()
        dist.all_gather_object(chunks, model_chunks(model))
    expected = set().union(*chunks)
    stored = {(t.key, c.offsets, c.sizes) for t in ckpt.tensors.values() for c in t.chunks}
    single = argparse.Namespace(**{**vars(args), "expert_model_parallel_size": 1, "expert_tensor_parallel_size": 1,
                                   "moe_grouped_gemm": False})
    with model_parallel(1, 1):
        model = build_and_load(ckpt.path, single, 1, 1)
        if dist.get_rank() == 0:
            logits, mtp = forward_logits(model, torch.tensor(tokens), mtp=True)
            torch.save(logits, logits_out)
            torch.save(mtp, logits_out + ".mtp")  # each MTP layer's logits (none without MTP)
    return {"layout_equal": expected == stored, "only_model": sorted(stored - expected)[:5],
            "only_ckpt": sorted(expected - stored)[:5], "args_tp": args.tensor_model_parallel_size,
            "args_pp": args.pipeline_model_parallel_size, "args_ep": getattr(args, "expert_model_parallel_size", 1),
            "args_etp": getattr(args, "expert_tensor_parallel_size", None),
            "args_grouped": getattr(args, "moe_grouped_gemm", False), "args_impl": getattr(args, "transformer_impl", None),
            "keys": sorted(ckpt.tensors)}


def run(job: dict) -> dict:
    op = job.pop("op")
    with wrong_mapping(job.pop("wrong_mapping", None)):
        return _run(op, job)


def _run(op: str, job: dict) -> dict:
    if op == "import":
        return import_hf(**job, quiet=True)
    if op == "import_ms":
        flags = argparse.Namespace(**job.pop("flags"))
        return import_mindspore(**job, ms_args=flags, quiet=True)
    if op == "reshard":
        return reshard(**job, quiet=True)
    if op == "export":
        return distconv.export(**job, quiet=True)
    if op == "check":
        return check(**job)
    raise ValueError(op)


def main() -> None:
    from distconv.megatron.model import cpu_compat

    jobs_path, results_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    results = []
    for job in json.load(open(jobs_path)):
        try:
            # megatron-core's forward pass (``check``) needs the CPU stand-ins for its CUDA calls
            with cpu_compat() if job["op"] == "check" else contextlib.nullcontext():
                results.append({"ok": True, "report": run(dict(job))})
        except distconv.DistconvError as e:
            results.append({"ok": False, "error": str(e)})
        dist.barrier()
    if dist.get_rank() == 0:
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1, default=str)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
