"""Build and run real megatron-core GPT models on CPU (gloo), for fixtures and the demo.

megatron-core 0.16 makes a few CUDA calls unconditionally; ``patch_cuda_for_cpu`` neutralises
exactly those (see ``shared/reference/megatron-on-cpu.md`` in the project's history). Nothing
here is used by the converter itself.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import torch
import torch.nn.functional as F


def patch_cuda_for_cpu() -> None:
    """Make megatron-core's unconditional CUDA calls harmless on a CPU-only process."""
    torch.cuda.synchronize = lambda *a, **k: None  # dist_checkpointing preload step
    torch.cuda.current_device = lambda: "cpu"  # finalize step, rotary embedding, masks
    torch.Tensor.cuda = lambda self, *a, **k: self  # tied-embedding sync across PP stages
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    try:
        from megatron.core.transformer.moe import moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None
    except ImportError:
        pass


def megatron_args(**overrides: Any) -> argparse.Namespace:
    """Megatron-LM training arguments (0.16 names) for a small Llama-style model."""
    args = dict(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        kv_channels=None,
        group_query_attention=True,
        num_query_groups=2,
        max_position_embeddings=128,
        seq_length=32,
        position_embedding_type="rope",
        rotary_base=10000,
        rotary_percent=1.0,
        rotary_interleaved=False,
        rotary_seq_len_interpolation_factor=None,
        use_rope_scaling=False,
        rope_scaling_factor=8.0,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        layernorm_zero_centered_gamma=False,
        swiglu=True,
        squared_relu=False,
        openai_gelu=False,
        bias_gelu_fusion=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=False,
        untie_embeddings_and_output_weights=True,
        vocab_size=None,
        padded_vocab_size=256,
        make_vocab_size_divisible_by=64,
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=None,
        window_size=None,
        num_experts=None,
        multi_latent_attention=False,
        bf16=False,
        fp16=False,
        params_dtype=torch.float32,
        init_method_std=0.02,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=1,
        world_size=1,
        data_parallel_size=1,
        ckpt_format="torch_dist",
        transformer_impl="local",
        iteration=0,
    )
    args.update(overrides)
    if args["kv_channels"] is None:
        args["kv_channels"] = args["hidden_size"] // args["num_attention_heads"]
    return argparse.Namespace(**args)


def transformer_config(args: argparse.Namespace, tp: int, pp: int, init: bool = True):
    """The TransformerConfig Megatron-LM derives from ``args`` (the fields our fixtures use)."""
    from megatron.core.transformer import TransformerConfig

    activation = F.silu if args.swiglu else (F.gelu)
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.layernorm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=activation,
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=args.init_method_std,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        perform_initialization=init,
    )


def build_gpt(args: argparse.Namespace, tp: int, pp: int, init: bool = True):
    """A megatron-core ``GPTModel`` (local layer spec) for this rank's pipeline stage.

    ``init=False`` skips weight initialisation (fast; for benchmarks that fill weights later).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = transformer_config(args, tp, pp, init)
    spec = get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm, normalization=args.normalization)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
    )


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, bf16_exact: bool = False) -> None:
    """Give every parameter (norms and biases too) distinct random values, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
        else:
            value = 0.05 * torch.randn(p.shape, generator=gen)
        if bf16_exact:  # values a bf16 checkpoint represents exactly
            value = value.to(torch.bfloat16).float()
        p.copy_(value)


@torch.no_grad()
def forward_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """megatron-core's own forward pass on CPU: logits [batch, seq, padded_vocab]."""
    model.eval()
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)
    return model(tokens, position_ids, mask)
