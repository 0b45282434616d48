"""Build real Megatron-LM-style torch_dist checkpoints with megatron-core on CPU.

Run under torchrun (gloo), once, with as many ranks as the largest layout needs::

    torchrun --nproc-per-node 4 -m distconv.testing.build --out DIR [--only NAME ...]

For every model in ``ALL_FIXTURES`` it builds the model at TP1PP1 with seeded random weights,
records megatron-core's own logits (and its MTP layers') on fixed tokens (``DIR/refs/NAME.pt``), saves it, then
re-loads those weights into the model at each other TP x PP (x EP [x ETP]) layout through
``dist_checkpointing`` and saves that layout too: ``DIR/NAME/tp{T}pp{P}[ep{E}][etp{X}]/`` is a Megatron-LM save
root (``latest_checkpointed_iteration.txt``, ``iter_XXXXXXX/`` or ``release/``, ``common.pt``
with ``args``) with optimizer state beside the weights, as training leaves it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distconv.sources.checkpoint import iteration_dir
from distconv.testing.expert_keys import save_expert_key_form
from distconv.megatron_model import build_gpt, cpu_compat, forward_logits, sharded_state_dict
from distconv.testing.megatron_cpu import megatron_args, model_parallel, randomize_

ALL_LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2))
# MoE: EP2, PP2xEP2, TP2xEP2 (expert TP = TP = 2), TP2xEP2 with expert TP 1
MOE_LAYOUTS = ((1, 1), (1, 1, 2), (1, 2, 2), (2, 1, 2), (2, 1, 2, 1))
TOKENIZER_VOCAB = 250
MOE_BASE = dict(num_layers=2, num_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2)


@dataclasses.dataclass(frozen=True)
class Fixture:
    """One model to build: Megatron-LM args, a seed and the layouts to save."""

    args: dict[str, Any]
    seed: int
    layouts: tuple[tuple[int, ...], ...] = ALL_LAYOUTS  # (tp, pp[, ep[, etp]])
    iteration: int | str = 100  # a number or "release"
    bf16: bool = False  # save bf16 weights (values chosen exactly representable)
    tokenizer: bool = False  # point args.tokenizer_model at a local HF tokenizer
    torch_format: tuple[tuple[int, int], ...] = ()  # layouts also saved in the legacy torch format
    expert_key_forms: tuple[str, ...] = ()  # also save the reference with per-expert keys (expert_keys.FORMS)


FIXTURES: dict[str, Fixture] = {
    "llama": Fixture(dict(untie_embeddings_and_output_weights=True), seed=1, tokenizer=True, torch_format=((2, 2),)),
    "llama_tied_mqa": Fixture(
        dict(untie_embeddings_and_output_weights=False, num_query_groups=1,
             use_rope_scaling=True, rope_scaling_factor=8.0, rotary_base=500000),
        seed=2, layouts=((1, 1), (2, 2)), iteration="release",
    ),
    "mistral": Fixture(dict(vocab_size=250, rotary_base=1000000, layernorm_epsilon=1e-6), seed=3),
    "qwen2": Fixture(dict(add_qkv_bias=True, bf16=True, params_dtype=torch.bfloat16), seed=4, bf16=True),
    "qwen3": Fixture(
        dict(qk_layernorm=True, kv_channels=32, untie_embeddings_and_output_weights=False,
             layernorm_epsilon=1e-6),
        seed=5,
    ),
    "gpt2": Fixture(
        dict(position_embedding_type="learned_absolute", normalization="LayerNorm", swiglu=False,
             add_bias_linear=True, group_query_attention=False, num_query_groups=4, ffn_hidden_size=256,
             bias_gelu_fusion=True, vocab_size=250),
        seed=11, layouts=((1, 1), (2, 2)), torch_format=((2, 2),),
    ),
    "mixtral": Fixture(dict(MOE_BASE), seed=6, layouts=MOE_LAYOUTS, expert_key_forms=("sequential", "grouped_gemm")),
    "qwen2_moe": Fixture(
        dict(MOE_BASE, num_layers=4, moe_layer_freq=[0, 1, 1, 1], add_qkv_bias=True, moe_router_pre_softmax=True,
             moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True, layernorm_epsilon=1e-6),
        seed=7, layouts=MOE_LAYOUTS[:4],
    ),
    "qwen3_moe": Fixture(
        dict(MOE_BASE, qk_layernorm=True, kv_channels=32, num_experts=8, moe_router_topk=3,
             untie_embeddings_and_output_weights=False, layernorm_epsilon=1e-6),
        seed=8, layouts=MOE_LAYOUTS[:4],
    ),
    "deepseek_v3": Fixture(
        dict(MOE_BASE, num_experts=8, moe_ffn_hidden_size=16, moe_layer_freq=[0, 1], multi_latent_attention=True,
             qk_layernorm=True, group_query_attention=False, q_lora_rank=24, kv_lora_rank=32, qk_head_dim=16,
             qk_pos_emb_head_dim=8, v_head_dim=16, rope_type="yarn", rotary_scaling_factor=4.0, mscale=1.0,
             mscale_all_dim=1.0, max_position_embeddings=16384, moe_router_score_function="sigmoid",
             moe_router_enable_expert_bias=True, moe_router_num_groups=2, moe_router_group_topk=1,
             moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size=32, layernorm_epsilon=1e-6,
             mtp_num_layers=1),
        seed=9, layouts=MOE_LAYOUTS[:4],
    ),
    # GLM-4.5: GQA with q/k/v bias and q/k norm, half the head rotated, a dense first layer, DeepSeek-V3's
    # router, two MTP layers
    "glm4_moe": Fixture(
        dict(MOE_BASE, num_layers=4, moe_layer_freq=[0, 1, 1, 1], kv_channels=32, add_qkv_bias=True, qk_layernorm=True,
             rotary_percent=0.5, rotary_base=1000000, num_experts=8, moe_ffn_hidden_size=16,
             moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=2,
             moe_router_group_topk=1, moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size=16,
             mtp_num_layers=2),
        seed=12, layouts=((1, 1), (1, 2, 2), (2, 1, 2)),
    ),
    # GLM-4.5's other settings: no q/k/v bias or q/k norm, the whole head rotated (HF's default is half),
    # every layer MoE, one group, top-1 (not renormalised), no scaling, two experts' width shared
    "glm4_moe_plain": Fixture(
        dict(MOE_BASE, kv_channels=32, num_experts=8, moe_ffn_hidden_size=16, moe_router_topk=1,
             moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
             moe_shared_expert_intermediate_size=32),
        seed=13, layouts=((1, 1), (1, 1, 2)),
    ),
    # the other MLA query path (linear_q_proj, no q LoRA), plain RoPE, ungrouped routing, all layers MoE
    "deepseek_v3_q_proj": Fixture(
        dict(MOE_BASE, multi_latent_attention=True, qk_layernorm=True, group_query_attention=False, kv_lora_rank=32,
             qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=32, rope_type="rope", moe_router_score_function="sigmoid",
             moe_router_enable_expert_bias=True, moe_shared_expert_intermediate_size=32, moe_ffn_hidden_size=32,
             layernorm_epsilon=1e-6),
        seed=10, layouts=((1, 1), (1, 2, 2)),
    ),
}

# Models vLLM's CPU kernels accept (tests/test_vllm.py), for the families whose FIXTURES model
# they do not: attention head size 32 (not 16), and MLA with kv_lora_rank 512 and a 64-wide rope
# part. Qwen3 and Qwen3-MoE use FIXTURES' own (head_dim 32). Two layers, saved at TP1PP1 only.
_SMALL = dict(num_layers=2, num_attention_heads=2, num_query_groups=1)
VLLM_FIXTURES: dict[str, Fixture] = {
    "vllm_llama": Fixture(dict(FIXTURES["llama"].args, **_SMALL), seed=21, layouts=((1, 1),), tokenizer=True),
    # sliding window: each token sees itself and the 5 before it (HF sliding_window 6)
    "vllm_mistral": Fixture(dict(FIXTURES["mistral"].args, **_SMALL, window_size=(5, 0)), seed=22, layouts=((1, 1),)),
    "vllm_qwen2": Fixture(dict(FIXTURES["qwen2"].args, **_SMALL), seed=23, layouts=((1, 1),), bf16=True),
    "vllm_gpt2": Fixture(dict(FIXTURES["gpt2"].args, num_layers=2, num_attention_heads=2, num_query_groups=2),
                         seed=24, layouts=((1, 1),)),
    "vllm_mixtral": Fixture(dict(FIXTURES["mixtral"].args, **_SMALL), seed=25, layouts=((1, 1),)),
    "vllm_qwen2_moe": Fixture(dict(FIXTURES["qwen2_moe"].args, **_SMALL, moe_layer_freq=[0, 1]), seed=26, layouts=((1, 1),)),
    "vllm_deepseek_v3": Fixture(
        dict(FIXTURES["deepseek_v3"].args, num_attention_heads=2, kv_lora_rank=512, qk_head_dim=32,
             qk_pos_emb_head_dim=64, v_head_dim=32, mtp_num_layers=None),
        seed=27, layouts=((1, 1),),
    ),
    "vllm_deepseek_v3_q_proj": Fixture(  # the other MLA query path: q_proj, no q LoRA
        dict(FIXTURES["deepseek_v3"].args, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=512, qk_head_dim=32,
             qk_pos_emb_head_dim=64, v_head_dim=32, mtp_num_layers=None),
        seed=28, layouts=((1, 1),),
    ),
}
ALL_FIXTURES: dict[str, Fixture] = {**FIXTURES, **VLLM_FIXTURES}

REFERENCE_TOKENS_SHAPE = (2, 12)


def parallel(layout: tuple[int, ...]) -> tuple[int, int, int, int]:
    """``(tp, pp[, ep[, etp]])`` -> ``(tp, pp, ep, etp)``; expert TP defaults to TP, as in Megatron."""
    tp, pp, ep, etp = (*layout, 1, None, None)[:4] if len(layout) == 2 else (*layout, None)[:4]
    return tp, pp, ep, tp if etp is None else etp


def layout_dir(out: Path, name: str, tp: int, pp: int, ep: int = 1, etp: int | None = None) -> Path:
    suffix = (f"ep{ep}" if ep > 1 else "") + (f"etp{etp}" if etp not in (None, tp) else "")
    return out / name / f"tp{tp}pp{pp}{suffix}"


def write_tokenizer(path: Path) -> None:
    """A small local HF tokenizer (word-level, ``TOKENIZER_VOCAB`` tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, TOKENIZER_VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))


def _optimizer_state(model: torch.nn.Module, seed: int, shared: bool = False) -> dict[str, Any]:
    """Adam moments laid out like the model (``optimizer.state.*`` keys, fully_reshardable).

    ``shared=True`` makes every moment a view of one random buffer (no memory per tensor).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = sharded_state_dict(model)
    apply_factories(sd)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    pool = torch.randn(max((p.numel() for p in model.parameters()), default=1), generator=gen) if shared else None

    for x in nested_values(sd):
        if isinstance(x, ShardedTensor):
            for moment in ("exp_avg", "exp_avg_sq"):
                if pool is not None:
                    data = pool[: torch.Size(x.local_shape).numel()].view(x.local_shape)
                else:
                    data = torch.randn(x.local_shape, generator=gen)
                out[f"{moment}.{x.key}.{len(out)}"] = dataclasses.replace(
                    x, key=f"optimizer.state.{moment}.{x.key}", data=data, dtype=torch.float32
                )
    return out


def save_layout(model: torch.nn.Module, args: argparse.Namespace, root: Path, fx: Fixture,
                shared_moments: bool = False, optimizer: bool = True) -> None:
    """Save like Megatron-LM: iteration folder, common state, tracker file written last."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    iter_name = iteration_dir(fx.iteration)
    ckpt = root / iter_name
    if dist.get_rank() == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = {
        "model": sharded_state_dict(model),
        "optimizer": {"state": _optimizer_state(model, fx.seed + 1000, shared_moments) if optimizer else {},
                      "param_groups": [{"lr": 1e-4}]},
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": 0 if fx.iteration == "release" else int(fx.iteration),
        "opt_param_scheduler": {"max_lr": 1e-4, "num_steps": 100},
        "num_floating_point_operations_so_far": 0,
    }
    strategy = FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy(), parallel_state.get_data_parallel_group()
    )
    dist_checkpointing.save(state, str(ckpt), sharded_strategy=strategy)
    dist.barrier()
    if dist.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text(str(fx.iteration))
    dist.barrier()


def torch_format_dir(out: Path, name: str, tp: int, pp: int) -> Path:
    return out / name / f"tp{tp}pp{pp}_torch"


def save_torch_format(model: torch.nn.Module, args: argparse.Namespace, root: Path, fx: Fixture) -> None:
    """Save like Megatron-LM with ``--ckpt-format torch``: one mp_rank file per (TP, PP) rank."""
    from megatron.core import parallel_state as ps

    iter_name = iteration_dir(fx.iteration)
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    if ps.get_data_parallel_rank() == 0:
        name = f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if args.pipeline_model_parallel_size > 1 else "")
        folder = root / iter_name / name
        folder.mkdir(parents=True, exist_ok=True)
        model_sd = model.state_dict_for_save_checkpoint()
        gen = torch.Generator().manual_seed(fx.seed + 2000)
        state = {
            "args": argparse.Namespace(**{**vars(args), "ckpt_format": "torch"}),
            "checkpoint_version": 3.0,
            "iteration": 0 if fx.iteration == "release" else int(fx.iteration),
            "model": model_sd,
            "optimizer": {"optimizer": {"state": {i: {"exp_avg": torch.randn(t.shape, generator=gen)}
                                                  for i, t in enumerate(v for v in model_sd.values() if isinstance(v, torch.Tensor))},
                                        "param_groups": [{"lr": 1e-4}]}},
            "rng_state": [{"torch_rng_state": torch.get_rng_state()}],
            "opt_param_scheduler": {"max_lr": 1e-4, "num_steps": 100},
            "num_floating_point_operations_so_far": 0,
        }
        torch.save(state, folder / "model_optim_rng.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text(str(fx.iteration))
    dist.barrier()


def build_fixture(name: str, fx: Fixture, out: Path) -> None:
    from megatron.core import dist_checkpointing

    world = dist.get_world_size()
    rank = dist.get_rank()
    base_args = megatron_args(**fx.args)
    if fx.tokenizer:
        tok_dir = out / "tokenizer"
        if rank == 0 and not tok_dir.exists():
            write_tokenizer(tok_dir)
        dist.barrier()
        base_args.tokenizer_model = str(tok_dir)

    first = None
    for layout in fx.layouts:
        tp, pp, ep, etp = parallel(layout)
        with model_parallel(tp, pp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp):
            args = argparse.Namespace(**vars(base_args))
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
            args.expert_model_parallel_size, args.expert_tensor_parallel_size = ep, etp
            args.world_size, args.data_parallel_size = world, world // (tp * pp)
            model = build_gpt(args, tp, pp)
            if first is None:
                assert (tp, pp, ep) == (1, 1, 1), "the first layout is the reference"
                randomize_(model, fx.seed, bf16_exact=fx.bf16)
                if rank == 0:
                    gen = torch.Generator().manual_seed(fx.seed + 7)
                    true_vocab = fx.args.get("vocab_size") or (TOKENIZER_VOCAB if fx.tokenizer else args.padded_vocab_size)
                    tokens = torch.randint(0, true_vocab, REFERENCE_TOKENS_SHAPE, generator=gen)
                    logits, mtp = forward_logits(model, tokens, mtp=True)
                    (out / "refs").mkdir(parents=True, exist_ok=True)
                    torch.save({"tokens": tokens, "logits": logits.float(), "mtp_logits": [x.float() for x in mtp]},
                               out / "refs" / f"{name}.pt")
            else:
                loaded = dist_checkpointing.load({"model": sharded_state_dict(model)}, str(first))
                model.load_state_dict(loaded["model"])
            if fx.bf16:
                model = model.to(torch.bfloat16)
            root = layout_dir(out, name, tp, pp, ep, etp)
            save_layout(model, args, root, fx)
            if (tp, pp) in fx.torch_format:
                save_torch_format(model, args, torch_format_dir(out, name, tp, pp), fx)
            if first is None:
                iter_name = iteration_dir(fx.iteration)
                first = root / iter_name
                reference_args = args
    for form in fx.expert_key_forms:
        save_expert_key_form(first, out / name / f"{form}_keys", reference_args, form)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--only", nargs="*", help="fixture names (default: all)")
    parser.add_argument("--layouts", nargs="*", help="restrict layouts, e.g. 2x2 1x1 2x1x2")
    opts = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    names = opts.only or list(ALL_FIXTURES)
    for name in names:
        fx = ALL_FIXTURES[name]
        if opts.layouts:
            wanted = {tuple(int(x) for x in s.split("x")) for s in opts.layouts}
            fx = dataclasses.replace(fx, layouts=tuple(l for l in fx.layouts if l in wanted or l == (1, 1)))
        if dist.get_rank() == 0:
            shown = ", ".join(layout_dir(Path(), "", *parallel(l)).name.upper() for l in fx.layouts)
            print(f"building {name} at {shown}", flush=True)
        with cpu_compat():
            build_fixture(name, fx, opts.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
