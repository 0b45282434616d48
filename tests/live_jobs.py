"""A training job that refits a running vLLM from its live megatron-core model, at TP2 and at PP2.

    torchrun --nproc-per-node 2 tests/live_jobs.py WORKDIR

tests/vllm_live.py serves the vLLM engine (its port in ``WORKDIR/rpc_port``). Each rank builds
its TP shard of a small Llama with random weights and makes one ``distconv.weights(model=...)``
source (fp32) and one ``GlooSender``; rank 0 writes the source's HF config into
``WORKDIR/hf0/`` (vLLM starts from it with dummy weights). Then, twice: perturb the weights, give
every parameter a NaN gradient (a source that read gradients would fail), sync into vLLM, check
the parameters are bit-identical to before the sync, have vLLM generate, save the model with
megatron-core (``WORKDIR/ckpt{i}``) and export that checkpoint with ``distconv.export``
(``WORKDIR/hf{i}``): the test compares vLLM with transformers on that folder. The first round
also checks one more pass of the source, and of a bf16 and a block-FP8 source, bit for bit
against the exports in fp32, bf16 and fp8 (FP8 weights with their ``weight_scale_inv``). Round 3
builds the model again at PP2 (rank 1 holds layer 1, the final norm and the output layer) and syncs it with each stage sending its own layer groups
(``senders="holders"``: nothing gathered; a second link into the same engine). Then
``distconv.weights(load=...)`` syncs round 1's checkpoint from disk (no HF folder written for it)
from rank 0 alone (a third link). Then a sync of the PP2 model with a
NaN in rank 1's layer 1 must fail on every rank; vLLM's call log and what it then serves are
recorded. Rounds 4 and 5: the same vLLM process replaces its engine by a Qwen3-MoE one (from
``WORKDIR/moe0/config.json``), and a Qwen3-MoE model at EP2 (each rank holds 4 of the 8 experts of
each layer) refits it as above, with ``senders="holders"``: each EP rank sends its own experts
(rank 0 the rest), both into the same ``update_weights`` of a layer; the source's groups, holders
and held names, its plan's gathered units, one pass of ``iter_groups()`` (which tensors it yields)
and the last sync's ``update_weights`` infos (names and per-tensor sources, as vLLM got them) are
recorded. Last, rank 1 dies (``os._exit``: its connections close as a killed
process's do) in the middle of a MoE sync, after the first group went to vLLM: rank 0 records its
error, vLLM's call log and what vLLM then serves, then sends vLLM an ``update_weights`` naming a
source that is no sender (it must refuse it), and ends without the job's teardown (a peer is
gone). ``WORKDIR/rank{R}.json`` holds the results (rank 1 writes its file before it dies).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys
import time
import xmlrpc.client
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

import distconv
from distconv.megatron.model import build_gpt, cpu_compat
from distconv.vllm.sender import GlooSender, Link
from fixtures.build import FIXTURES, Fixture, save_layout
from fixtures.megatron_cpu import megatron_args, model_parallel, randomize_

ARGS = dict(num_layers=2, num_attention_heads=2, num_query_groups=2, vocab_size=250)  # head size 32: vLLM's CPU kernels
SEED = 31
MOE = Fixture(FIXTURES["qwen3_moe"].args, seed=32)  # 8 experts, top 3; tied embeddings; head size 32
PROMPTS = [[5, 17, 33, 101, 7, 9, 200, 45, 150, 3, 88, 240], [3, 4, 5, 6, 7]]
MAX_TOKENS = 8
BAD = "decoder.layers.0.mlp.linear_fc2.weight"  # at PP2, rank 1's (layer 1's): given a NaN for the failing sync


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int, expert_seed: int) -> None:
    """Add noise (routed experts' from ``expert_seed``) and give every parameter a NaN gradient."""
    gens = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(expert_seed)]
    for name, p in sorted(model.named_parameters()):
        p.add_(0.05 * torch.randn(p.shape, generator=gens[".experts." in name]))
        p.grad = torch.full_like(p, float("nan"))


def exported(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def same_as_export(source, folder: Path, rank: int) -> bool | None:
    """One pass of ``source`` (collective), bit for bit against the export's tensors, on rank 0."""
    got = dict(iter(source))
    if rank != 0:
        return None
    want = exported(folder)
    meta = {m.name: (m.dtype, tuple(m.shape)) for m in source.metadata()}
    return (got.keys() == want.keys() == meta.keys() and all(same_bytes(got[k], want[k]) for k in want)
            and all(meta[k] == (want[k].dtype, tuple(want[k].shape)) for k in want))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (FP8 has no comparison kernels on the CPU)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(tp: int, pp: int, ep: int = 1, fx: Fixture = Fixture(ARGS, SEED)):
    """This rank's part of the model at TP x PP x EP (2 ranks), with random weights, and its args."""
    args = megatron_args(**fx.args)
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    args.expert_model_parallel_size = ep
    args.world_size, args.data_parallel_size = 2, 2 // (tp * pp)
    model = build_gpt(args, tp, pp)
    randomize_(model, fx.seed)
    return model, args


def sync_round(i: int, model, args, source, sender: GlooSender, client, work: Path, rank: int,
               fx: Fixture = Fixture(ARGS, SEED)) -> dict:
    """Perturb, sync, have vLLM generate, save with megatron-core and export that checkpoint."""
    # at EP2 the 2 ranks are data-parallel replicas of all but the experts: those stay the same on both
    perturb(model, 100 * i + (rank if args.expert_model_parallel_size == 1 else 0), 100 * i + rank)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = sender.send(f"v{i}", source)
    result = {"sync": stats,
              "identical": all(torch.equal(p, before[n]) for n, p in model.named_parameters()),
              "grads_untouched": all(p.grad.isnan().all().item() for p in model.parameters())}
    if rank == 0:
        result["vllm"] = client.generate(PROMPTS, MAX_TOKENS)
    save_layout(model, args, work / f"ckpt{i}", fx, optimizer=False)
    distconv.export(work / f"ckpt{i}", work / f"hf{i}", quiet=True)
    return result


def failed_sync(model, source, sender: GlooSender, rank: int, bad: str) -> str | None:
    """A sync with a NaN in rank 1's ``bad`` parameter: the error it raised here (None: none)."""
    param = dict(model.named_parameters())[bad]
    if rank == 1:
        with torch.no_grad():
            kept = param.view(-1)[7].item()
            param.view(-1)[7] = float("nan")
    try:
        sender.send("bad", source)
        return None
    except distconv.DistconvError as e:
        return str(e)
    finally:
        if rank == 1:
            with torch.no_grad():
                param.view(-1)[7] = kept


def exit_now() -> None:
    """End this process at once, with status 0, without clean-up: as a killed process, but with its
    child processes (megatron-core's save manager) ended first, or they would outlive it and hold
    torchrun's output open."""
    for child in multiprocessing.active_children():
        child.kill()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def killed_sync(source, sender: GlooSender, rank: int) -> dict | None:
    """A sync rank 1 leaves mid-pass (it dies before it agrees on the second group, the first one
    sent): on rank 0 the error it raised and how long the sync ran (None: no error)."""
    if rank == 1:
        agreements = [0]
        agree = source._comm.agree

        def dying(error):
            agreements[0] += 1
            if agreements[0] == 3:  # the first group's two agreements (read, sent) are behind
                exit_now()  # status 0: torchrun waits for rank 0 then, as it would not after a non-zero exit
            agree(error)

        source._comm.agree = dying
    started = time.perf_counter()
    try:
        sender.send("killed", source)
        return None
    except distconv.DistconvError as e:
        return {"error": str(e), "seconds": time.perf_counter() - started}


def refused_update(client) -> str | None:
    """An ``update_weights`` naming a source that is no sender (the gloo group's rank 2 is vLLM's
    worker): the error vLLM answered (None: none)."""
    try:
        client.update_weights({"names": ["model.norm.weight"], "dtype_names": ["float32"], "shapes": [[64]], "srcs": [2]})
        return None
    except xmlrpc.client.Fault as e:
        return e.faultString


def main() -> None:
    work = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict = {"rounds": [], "groups": []}
    with cpu_compat():
        with model_parallel(2, 1):  # rounds 1 and 2 at TP2
            model, args = build(2, 1)
            started = time.perf_counter()
            source = distconv.weights(model=model, args=args, dtype="fp32", window="64KB")
            out["plan_s"] = time.perf_counter() - started
            out["groups"].append(source.groups())
            if rank == 0:
                (work / "hf0").mkdir()
                source.config.to_json_file(str(work / "hf0" / "config.json"))
                while not (work / "rpc_port").exists():
                    time.sleep(0.2)
            port_file = work / "rpc_port"
            client = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port_file.read_text()}", allow_none=True) if rank == 0 else None
            port = [free_port()]
            dist.broadcast_object_list(port)
            sender = GlooSender(source, client, Link("127.0.0.1", port[0], workers=1, timeout_s=120))
            for i in (1, 2):
                result = sync_round(i, model, args, source, sender, client, work, rank)
                if i == 1:
                    result["fp32_pass_equals_export"] = same_as_export(source, work / "hf1", rank)
                    distconv.export(work / "ckpt1", work / "hf1_bf16", dtype="bf16", quiet=True)
                    with distconv.weights(model=model, args=args, dtype="bf16") as bf16:
                        result["bf16_pass_equals_export"] = same_as_export(bf16, work / "hf1_bf16", rank)
                    distconv.export(work / "ckpt1", work / "hf1_fp8", dtype="fp8", quiet=True)
                    with distconv.weights(model=model, args=args, dtype="fp8") as fp8:
                        result["fp8_pass_equals_export"] = same_as_export(fp8, work / "hf1_fp8", rank)
                        result["fp8_tensors"] = [m.name for m in fp8.metadata() if m.dtype == torch.float8_e4m3fn]
                out["rounds"].append(result)
            source.close()
        with model_parallel(1, 2):  # round 3 at PP2 (into the same engine), each stage sending its own layers
            model, args = build(1, 2)
            with distconv.weights(model=model, args=args, dtype="fp32", senders="holders") as source:
                out["groups"].append(source.groups())
                out["pp2_gathered"] = [u.gathered for u in source._mapped.plan.units]
                sender.close()
                port = [free_port()]
                dist.broadcast_object_list(port)
                staged = GlooSender(source, client, Link("127.0.0.1", port[0], workers=1, timeout_s=120))
                out["rounds"].append(sync_round(3, model, args, source, staged, client, work, rank))
                staged.close()
            port = [free_port()]
            dist.broadcast_object_list(port)
            with distconv.weights(load=work / "ckpt1", dtype="fp32") as disk:  # round 1's weights, from its checkpoint
                # from rank 0 alone again, as the failure after it
                sender = GlooSender(disk, client, Link("127.0.0.1", port[0], workers=1, timeout_s=120))
                out["from_checkpoint"] = {"sync": sender.send("ckpt1", disk)}
                if rank == 0:
                    out["from_checkpoint"]["vllm"] = client.generate(PROMPTS, MAX_TOKENS)
            with distconv.weights(model=model, args=args, dtype="fp32") as source:
                out["failure"] = failed_sync(model, source, sender, rank, BAD)
            if rank == 0:
                out["calls"] = client.calls()
                out["served_after_failure"] = client.generate(PROMPTS, 2)
            sender.close()
        with model_parallel(1, 1, expert_model_parallel_size=2):  # rounds 4 and 5: Qwen3-MoE at EP2, then rank 1 dies
            model, args = build(1, 1, 2, MOE)
            with distconv.weights(model=model, args=args, dtype="fp32", senders="holders") as source:
                out["moe_groups"] = source.groups()
                out["moe_holders"] = source.holders()
                out["moe_held"] = sorted(source.held_names())
                out["moe_gathered"] = [o.name for u in source._mapped.plan.units if u.gathered for o in u.outputs]
                # one pass through the WeightSource API: each group's names and which tensors this rank yields
                out["moe_iter"] = [[names, [t is not None for t in tensors]] for names, tensors in source.iter_groups()]
                if rank == 0:
                    (work / "moe0").mkdir()
                    source.config.to_json_file(str(work / "moe0" / "config.json"))
                    client.serve("moe0")
                port = [free_port()]
                dist.broadcast_object_list(port)
                sender = GlooSender(source, client, Link("127.0.0.1", port[0], workers=1, timeout_s=120))
                out["moe_senders"] = sender.senders
                for i in (4, 5):
                    out["rounds"].append(sync_round(i, model, args, source, sender, client, work, rank, MOE))
                if rank == 0:
                    out["moe_updates"] = client.updates()  # round 5's
                dist.barrier()
                if rank == 1:  # written before it dies
                    (work / f"rank{rank}.json").write_text(json.dumps(out))
                out["killed"] = killed_sync(source, sender, rank)
            if rank == 0:
                out["calls_killed"] = client.calls()
                out["served_after_killed"] = client.generate(PROMPTS, 2)
                out["bad_src"] = refused_update(client)
                client.stop()
    (work / f"rank{rank}.json").write_text(json.dumps(out))
    exit_now()  # rank 1 is gone: no teardown of the job's groups (it would wait on it)


if __name__ == "__main__":
    main()
