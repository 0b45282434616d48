"""Build and run megatron-core's own ``GPTModel`` from a checkpoint's Megatron-LM args.

``distconv verify`` compares an export against this model, and the test fixtures are built
with it. The model is built from megatron-core's local layer specs (no transformer-engine; the
tests build models from its transformer-engine spec too, with stand-in modules).
megatron-core 0.16 makes a few CUDA calls unconditionally; ``cpu_compat`` makes exactly those
harmless on a machine without CUDA, only while it is active, and restores them on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
from typing import Any, Iterator

import torch
import torch.nn.functional as F

# Megatron-LM's values for the args the builder reads, for args that lack some (older
# Megatron-LM, dense models); the sizes describe a small Llama-style model (test fixtures).
ARG_DEFAULTS: dict[str, Any] = dict(
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
    moe_ffn_hidden_size=None,
    moe_router_topk=2,
    moe_router_pre_softmax=False,
    moe_router_score_function="softmax",
    moe_router_topk_scaling_factor=None,
    moe_router_enable_expert_bias=False,
    moe_router_num_groups=None,
    moe_router_group_topk=None,
    moe_router_load_balancing_type="aux_loss",
    moe_aux_loss_coeff=0.0,
    moe_shared_expert_intermediate_size=None,
    moe_shared_expert_gate=False,
    moe_layer_freq=1,
    moe_grouped_gemm=False,
    moe_token_dispatcher_type="allgather",
    multi_latent_attention=False,
    q_lora_rank=None,
    kv_lora_rank=32,
    qk_head_dim=16,
    qk_pos_emb_head_dim=8,
    v_head_dim=16,
    rope_type="rope",
    rotary_scaling_factor=1.0,
    mscale=1.0,
    mscale_all_dim=0.0,
    mtp_num_layers=None,
    bf16=False,
    fp16=False,
    params_dtype=torch.float32,
    init_method_std=0.02,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    tensor_model_parallel_size=1,
    pipeline_model_parallel_size=1,
    expert_model_parallel_size=1,
    expert_tensor_parallel_size=None,
    world_size=1,
    data_parallel_size=1,
    ckpt_format="torch_dist",
    transformer_impl="local",
    iteration=0,
)


Change = tuple[Any, str, Any]  # (object, attribute, the value it takes while a context is active)


def no_device_calls() -> list[Change]:
    """``torch.cuda.synchronize`` as a no-op and ``current_device`` as ``"cpu"``: megatron-core
    0.16's save and load call both unconditionally (after staging tensors to CPU, and for the
    failure flag they broadcast), though neither needs a GPU for CPU tensors on gloo."""
    return [(torch.cuda, "synchronize", lambda *a, **k: None), (torch.cuda, "current_device", lambda: "cpu")]


@contextlib.contextmanager
def stand_ins(changes: list[Change]) -> Iterator[None]:
    """Set every attribute in ``changes`` while active; put each back (or remove it) on exit."""
    saved = [(obj, name, name in vars(obj), vars(obj).get(name)) for obj, name, _ in changes]
    for obj, name, value in changes:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, had, value in reversed(saved):
            if had:
                setattr(obj, name, value)
            else:
                delattr(obj, name)


@contextlib.contextmanager
def cpu_compat() -> Iterator[None]:
    """Without CUDA: make megatron-core's unconditional CUDA calls harmless while active.

    Replaced, and put back on exit: ``torch.cuda.synchronize`` (dist_checkpointing's preload)
    and ``current_device`` (finalize step, rotary embedding, masks), ``Tensor.cuda`` (the
    tied-embedding sync across PP stages), the CUDA RNG tracker's ``fork``, the sliding-window
    mask (built on the CPU instead), a missing
    ``moe_utils.te_general_gemm``, and ``multi_latent_attention.HAVE_TE`` (wrongly True when
    transformer-engine is absent: its extension imports with stand-ins). With CUDA nothing
    changes.
    """
    if torch.cuda.is_available():
        yield
        return
    from megatron.core import tensor_parallel
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    changes = no_device_calls() + [
        (torch.Tensor, "cuda", lambda self, *a, **k: self),
        (tensor_parallel.get_cuda_rng_tracker(), "fork", lambda *a, **k: contextlib.nullcontext()),
    ]
    if hasattr(fused_softmax, "get_sliding_window_causal_mask"):  # 0.16 builds the mask on "cuda"
        changes.append((fused_softmax, "get_sliding_window_causal_mask", _sliding_window_mask))
    if not hasattr(moe_utils, "te_general_gemm"):
        changes.append((moe_utils, "te_general_gemm", None))
    if importlib.util.find_spec("transformer_engine") is None:
        changes.append((multi_latent_attention, "HAVE_TE", False))
    with stand_ins(changes):
        yield


def _sliding_window_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    """megatron-core's sliding-window mask on the CPU: True where query ``q`` may not see key ``k``,
    i.e. outside ``[q - left, q + right]`` (queries are the last ``sq`` of ``skv`` positions)."""
    left, right = window_size
    q = torch.arange(sq)[:, None] + (skv - sq)
    k = torch.arange(skv)[None, :]
    return (k < q - left) | (k > q + right)


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` completed with ``ARG_DEFAULTS`` for fields it lacks (e.g. MoE off)."""
    full = {**ARG_DEFAULTS, **vars(args)}
    if full["kv_channels"] is None:
        full["kv_channels"] = full["hidden_size"] // full["num_attention_heads"]
    return argparse.Namespace(**full)


def _moe_fields(args: argparse.Namespace) -> dict[str, Any]:
    """MoE TransformerConfig fields from args (CPU: allgather dispatcher, no grouped GEMM)."""
    if not args.num_experts:
        return {}
    return dict(
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,
        moe_router_topk=args.moe_router_topk,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_score_function=args.moe_router_score_function,
        moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_router_num_groups=args.moe_router_num_groups,
        moe_router_group_topk=args.moe_router_group_topk,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=args.moe_shared_expert_gate,
        moe_layer_freq=args.moe_layer_freq,
        moe_grouped_gemm=args.moe_grouped_gemm,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )


def _mla_fields(args: argparse.Namespace) -> dict[str, Any]:
    if not args.multi_latent_attention:
        return {}
    return dict(
        q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank,
        qk_head_dim=args.qk_head_dim,
        qk_pos_emb_head_dim=args.qk_pos_emb_head_dim,
        v_head_dim=args.v_head_dim,
        rope_type=args.rope_type,
        rotary_base=args.rotary_base,
        rotary_scaling_factor=args.rotary_scaling_factor,
        mscale=args.mscale,
        mscale_all_dim=args.mscale_all_dim,
    )


def transformer_config(args: argparse.Namespace, tp: int, pp: int, init: bool = True):
    """The TransformerConfig Megatron-LM derives from ``args`` (the fields our fixtures use)."""
    args = with_defaults(args)
    from megatron.core.transformer import MLATransformerConfig, TransformerConfig

    activation, fusion = F.silu, False
    if not args.swiglu:  # as Megatron-LM: exact GELU, or the tanh form of the fused bias_gelu
        activation, fusion = F.gelu, bool(getattr(args, "bias_gelu_fusion", False))
        if getattr(args, "openai_gelu", False):
            from megatron.core.transformer.utils import openai_gelu

            activation, fusion = openai_gelu, False
    config_class = MLATransformerConfig if args.multi_latent_attention else TransformerConfig
    return config_class(
        **_moe_fields(args),
        **_mla_fields(args),
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
        window_size=tuple(args.window_size) if args.window_size else None,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=args.init_method_std,
        bias_activation_fusion=fusion,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        perform_initialization=init,
        **({"mtp_num_layers": args.mtp_num_layers} if args.mtp_num_layers else {}),  # only models with MTP layers
    )


def build_gpt(args: argparse.Namespace, tp: int, pp: int, init: bool = True, transformer_engine: bool = False):
    """A megatron-core ``GPTModel`` (local layer spec) for this rank's pipeline stage.

    ``init=False`` skips weight initialisation (fast; for benchmarks that fill weights later).
    ``transformer_engine=True``: from megatron-core's transformer-engine decoder block spec, as
    Megatron-LM builds models by default (needs transformer-engine's modules, or the tests'
    stand-ins).
    """
    args = with_defaults(args)
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    config = transformer_config(args, tp, pp, init)
    if transformer_engine:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization=args.normalization)
    elif args.num_experts and args.moe_layer_freq != 1:  # dense and MoE layers mixed
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=args.normalization)
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=args.num_experts, moe_grouped_gemm=args.moe_grouped_gemm,
            qk_layernorm=args.qk_layernorm, normalization=args.normalization,
            multi_latent_attention=args.multi_latent_attention,
        )
    if args.multi_latent_attention:
        _use_local_mla_attention(spec)
    mtp = {}
    if args.mtp_num_layers:  # MTP layers (on the last stage), built like the last decoder layer
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        mtp["mtp_block_spec"] = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=transformer_engine)
    return GPTModel(
        **mtp,
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


def _mla_core_attention():
    """megatron-core's local ``DotProductAttention``, taking MLA's separate key/value head sizes.

    In 0.16.1 the local MLA spec fails to build: ``MLASelfAttention`` passes ``k_channels`` and
    ``v_channels``, which only transformer-engine's attention accepts. The local attention's
    forward already works with any key and value head sizes (MLA passes the softmax scale);
    only its output width, ``heads x v_channels``, has to be set.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args: Any, k_channels: int | None = None, v_channels: int | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)  # (Attention builds it once without, MLA again with them)
            if v_channels is not None:
                self.hidden_size_per_partition = self.num_attention_heads_per_partition * v_channels

    return MLADotProductAttention


def _use_local_mla_attention(spec: Any) -> None:
    """Point every MLA layer of a layer or block spec at ``_mla_core_attention``."""
    layers = getattr(spec, "layer_specs", None) or [spec]
    core = _mla_core_attention()
    for layer in layers:
        layer.submodules.self_attention.submodules.core_attention = core


def sharded_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """``model.sharded_state_dict()`` with the metadata Megatron-LM passes: the data-parallel group,
    over which an MTP stage that is not the first ties its copy of the embedding."""
    from megatron.core import parallel_state

    return model.sharded_state_dict(metadata={"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)})


@torch.no_grad()
def forward_logits(model: torch.nn.Module, tokens: torch.Tensor, mtp: bool = False) -> Any:
    """megatron-core's own forward pass on CPU (one stage): logits [batch, seq, padded_vocab].

    With ``mtp``: ``(logits, [logits of each MTP layer])``; MTP layer ``k``'s logits at position
    ``i`` predict token ``i + k + 2``. megatron-core computes MTP outputs only as a loss (it needs
    labels); they are taken from its MTP block's output, through the model's output layer.
    """
    model.eval()
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)
    block = getattr(model, "mtp", None)
    if block is None:
        logits = model(tokens, position_ids, mask)
        return (logits, []) if mtp else logits
    seen: list[torch.Tensor] = []
    hook = block.register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        model(tokens, position_ids, mask, labels=tokens)
    finally:
        hook.remove()
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    hidden = torch.chunk(seen[0], 1 + len(block.layers), dim=0)  # [s, b, h] each: the decoder's, then each MTP layer's
    logits = [model.output_layer(h, weight=weight)[0].transpose(0, 1).contiguous() for h in hidden]
    return (logits[0], logits[1:]) if mtp else logits[0]
