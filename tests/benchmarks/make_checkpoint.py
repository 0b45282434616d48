"""Generate a large, real megatron-core torch_dist checkpoint for the benchmark (under torchrun).

    torchrun --nproc-per-node 4 tests/benchmarks/make_checkpoint.py --out DIR --gb 2 [--tp 2 --pp 2] [--hidden 1024]
        [--experts 8 --ep 2]

A Llama-shaped ``GPTModel`` (hidden 1024 unless ``--hidden``, head size 64, 4 query heads per
key-value group but at least one group per TP rank, SwiGLU with FFN 2.75 x hidden, vocab 32000, untied, bf16) with as many layers as
the requested weight size needs (with ``--experts N``, Mixtral-shaped: every layer's MLP is N
experts of that FFN width, top-2 routing, saved at ``--ep`` with expert TP 1), random bf16
weights, and Adam moments (fp32 ``exp_avg`` and
``exp_avg_sq``, laid out like the weights) as training leaves them, saved like Megatron-LM.
The moments are views of one random buffer per rank so that generating them costs no memory;
their bytes on disk are real.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from distconv.megatron.model import build_gpt, cpu_compat

from tests.fixtures.build import Fixture, save_layout
from tests.fixtures.megatron_cpu import megatron_args

HIDDEN, HEAD_DIM, VOCAB = 1024, 64, 32000


def shape_args(gb: float, tp: int, pp: int, world: int, hidden: int = HIDDEN, experts: int = 0,
               ep: int = 1) -> argparse.Namespace:
    heads = hidden // HEAD_DIM
    groups = max(tp, heads // 4)  # at least one key-value group per TP rank (narrow models)
    ffn = round(2.75 * hidden / 64) * 64
    mlp = (3 * ffn * hidden + hidden) * experts if experts else 3 * ffn * hidden  # experts and router, or one MLP
    per_layer = ((heads + 2 * groups) * HEAD_DIM * hidden + hidden * heads * HEAD_DIM + mlp + 2 * hidden) * 2
    embeddings = 2 * VOCAB * hidden * 2
    layers = max(pp, round((gb * 1e9 - embeddings) / per_layer) // pp * pp)
    moe = dict(num_experts=experts, moe_ffn_hidden_size=ffn, moe_router_topk=2, expert_model_parallel_size=ep,
               expert_tensor_parallel_size=1) if experts else {}
    return megatron_args(**moe,
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
        num_query_groups=groups, padded_vocab_size=VOCAB, vocab_size=VOCAB, max_position_embeddings=4096,
        seq_length=4096, bf16=True, params_dtype=torch.bfloat16, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, world_size=world, data_parallel_size=world // (tp * pp),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--gb", type=float, default=2.0, help="model weight size in GB (bf16)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=HIDDEN,
                        help="hidden size (a multiple of 128): wider models have larger chunks and fewer layers, narrower ones "
                             "more layers (deep models for the per-layer costs of verify)")
    parser.add_argument("--experts", type=int, default=0, help="experts per layer (0: a dense model)")
    parser.add_argument("--ep", type=int, default=2, help="with --experts: the expert-parallel size saved at")
    parser.add_argument("--no-optimizer", action="store_true",
                        help="skip the Adam moments (megatron-core's save stages a copy of every tensor "
                             "in RAM, so very large checkpoints with moments do not fit on small machines)")
    opts = parser.parse_args()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state

    ep = opts.ep if opts.experts else 1
    parallel_state.initialize_model_parallel(opts.tp, opts.pp, expert_model_parallel_size=ep, expert_tensor_parallel_size=1)
    args = shape_args(opts.gb, opts.tp, opts.pp, dist.get_world_size(), opts.hidden, opts.experts, ep)
    with cpu_compat():
        model = build_gpt(args, opts.tp, opts.pp, init=False).to(torch.bfloat16)
        gen = torch.Generator().manual_seed(dist.get_rank())
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02))
        if dist.get_rank() == 0:
            moe = f", {opts.experts} experts per layer at EP{ep}" if opts.experts else ""
            print(f"generating {args.num_layers} layers of hidden {opts.hidden}{moe}, {opts.gb} GB of bf16 weights "
                  f"at TP{opts.tp} PP{opts.pp}", flush=True)
        save_layout(model, args, opts.out, Fixture(args={}, seed=0, iteration=1000), shared_moments=True,
                    optimizer=not opts.no_optimizer)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
