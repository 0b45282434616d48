"""A version-independent description of the model, read from Megatron-LM's training args."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from distconv.errors import DistconvError

# the weight dtypes a user may ask for by name
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The architecture facts every mapping and HF config builder needs."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    padded_vocab_size: int
    max_position_embeddings: int
    normalization: str  # "RMSNorm" | "LayerNorm"
    norm_epsilon: float
    gated_mlp: bool  # swiglu
    activation: str  # HF hidden_act name
    add_bias_linear: bool
    add_qkv_bias: bool
    qk_layernorm: bool
    tie_embeddings: bool
    position_embedding: str
    rotary_base: float
    rotary_percent: float
    rotary_interleaved: bool
    rope_scaling: dict[str, Any] | None
    window_size: tuple[int, int] | None
    zero_centered_gamma: bool
    init_std: float
    train_dtype: torch.dtype
    vocab_size: int | None = None  # the true (unpadded) vocab, once known
    # mixture of experts (num_experts None: dense)
    num_experts: int | None = None
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE (True) or dense MLP
    moe_ffn_hidden_size: int | None = None
    moe_topk: int = 1
    moe_pre_softmax: bool = False  # softmax over all experts before top-k (else top-k of logits, then softmax)
    moe_score_function: str = "softmax"  # "softmax" | "sigmoid"
    moe_scaling_factor: float | None = None
    moe_expert_bias: bool = False  # router.expert_bias added to scores for selection only
    moe_num_groups: int | None = None
    moe_group_topk: int | None = None
    moe_shared_ffn_hidden_size: int | None = None
    moe_shared_gate: bool = False
    moe_capacity_factor: float | None = None  # token dropping
    moe_routing_type: str = "aux_loss"
    # multi-latent attention
    multi_latent_attention: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_head_dim: int | None = None
    qk_pos_emb_head_dim: int | None = None
    v_head_dim: int | None = None
    mtp_num_layers: int = 0

    @property
    def moe_group_score_topk(self) -> int | None:
        """Experts per group whose scores rank a group in group-limited routing (megatron-core: k / groups)."""
        return self.moe_topk // self.moe_group_topk if self.moe_group_topk else None

    @property
    def moe_shared_experts(self) -> int | None:
        """The shared expert's width in routed experts, when it is a whole number of them."""
        shared, routed = self.moe_shared_ffn_hidden_size, self.moe_ffn_hidden_size
        return shared // routed if shared and routed and shared % routed == 0 else None

    def is_moe(self, layer: int) -> bool:
        """Whether layer ``layer`` has experts. An MTP layer (``num_layers + m``) is built like the
        last decoder layer, as megatron-core's MTP block spec builds it."""
        return bool(self.num_experts) and self.moe_layers[min(layer, self.num_layers - 1)]

    @property
    def mtp_conflict(self) -> str | None:
        """Why the MTP layers have no HF form (HF's MTP layers are MoE and carry their own output head)."""
        if not self.mtp_num_layers:
            return None
        if self.tie_embeddings:
            return "MTP layers with tied embeddings"
        if self.num_experts and not self.is_moe(self.num_layers):
            return "MTP layers without experts"
        return None

    @property
    def plain_mha(self) -> bool:
        """Multi-head attention with ``heads * head_dim == hidden`` (no GQA, no custom head size)."""
        return self.num_query_groups == self.num_attention_heads and self.num_attention_heads * self.head_dim == self.hidden_size

    def with_vocab(self, vocab_size: int) -> "ModelSpec":
        if vocab_size > self.padded_vocab_size:
            raise DistconvError(
                f"vocab size {vocab_size} is larger than the checkpoint's padded vocab {self.padded_vocab_size}"
            )
        return dataclasses.replace(self, vocab_size=vocab_size)


def arg(args: argparse.Namespace, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``args`` holds and is not None (args were renamed over time)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            return value
    return default


def _activation(args: argparse.Namespace) -> str:
    if arg(args, "swiglu", default=False):
        return "silu"
    if arg(args, "squared_relu", default=False):
        return "relu2"
    if arg(args, "openai_gelu", default=False):
        return "gelu_new"
    if arg(args, "bias_gelu_fusion", default=False):
        return "gelu_fast"
    return "gelu"


def _rope_scaling(args: argparse.Namespace) -> dict[str, Any] | None:
    if arg(args, "multi_latent_attention", default=False) and arg(args, "rope_type", default="yarn") == "yarn":
        # MLA's YaRN; 0.16 has no CLI args for the last three (MLATransformerConfig defaults)
        return {
            "rope_type": "yarn",
            "factor": float(arg(args, "rotary_scaling_factor", default=40.0)),
            "original_max_position_embeddings": int(arg(args, "original_max_position_embeddings", default=4096)),
            "beta_fast": float(arg(args, "beta_fast", default=32.0)),
            "beta_slow": float(arg(args, "beta_slow", default=1.0)),
            "mscale": float(arg(args, "mscale", default=1.0)),
            "mscale_all_dim": float(arg(args, "mscale_all_dim", default=0.0)),
        }
    if arg(args, "use_rope_scaling", default=False):
        # megatron-core hard-codes Llama 3's low/high frequency factors and original length
        return {
            "rope_type": "llama3",
            "factor": float(arg(args, "rope_scaling_factor", default=8.0)),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    factor = arg(args, "rotary_seq_len_interpolation_factor")
    if factor:
        return {"rope_type": "linear", "factor": float(factor)}
    return None


def _moe_layers(args: argparse.Namespace, num_layers: int) -> tuple[bool, ...]:
    """Which layers are MoE: ``moe_layer_freq`` is an int N (every N-th layer) or a 0/1 list."""
    if not arg(args, "num_experts"):
        return (False,) * num_layers
    freq = arg(args, "moe_layer_freq", default=1)
    if isinstance(freq, str) and freq.strip().isascii() and freq.strip().isdigit():
        freq = int(freq)
    if isinstance(freq, int):
        return tuple(i % freq == 0 for i in range(num_layers))
    if isinstance(freq, (list, tuple)) and len(freq) == num_layers:
        return tuple(bool(x) for x in freq)
    raise DistconvError(f"cannot read moe_layer_freq={freq!r} for {num_layers} layers")


def _moe_and_mla(args: argparse.Namespace, num_layers: int) -> dict[str, Any]:
    experts = arg(args, "num_experts")
    mla = bool(arg(args, "multi_latent_attention", default=False))
    routing = arg(args, "moe_router_load_balancing_type", default="aux_loss")
    fields = dict(
        num_experts=int(experts) if experts else None,
        moe_layers=_moe_layers(args, num_layers),
        moe_ffn_hidden_size=arg(args, "moe_ffn_hidden_size", "ffn_hidden_size") if experts else None,
        moe_topk=int(arg(args, "moe_router_topk", default=2)),
        moe_pre_softmax=bool(arg(args, "moe_router_pre_softmax", default=False)),
        moe_score_function=arg(args, "moe_router_score_function", default="softmax"),
        moe_scaling_factor=arg(args, "moe_router_topk_scaling_factor"),
        moe_expert_bias=bool(arg(args, "moe_router_enable_expert_bias", default=False)),
        moe_num_groups=arg(args, "moe_router_num_groups"),
        moe_group_topk=arg(args, "moe_router_group_topk"),
        moe_shared_ffn_hidden_size=arg(args, "moe_shared_expert_intermediate_size"),
        moe_shared_gate=bool(arg(args, "moe_shared_expert_gate", default=False)),
        moe_capacity_factor=arg(args, "moe_expert_capacity_factor"),
        moe_routing_type=routing if isinstance(routing, str) else ",".join(routing),
        multi_latent_attention=mla,
        q_lora_rank=arg(args, "q_lora_rank") if mla else None,
        kv_lora_rank=arg(args, "kv_lora_rank") if mla else None,
        qk_head_dim=arg(args, "qk_head_dim") if mla else None,
        qk_pos_emb_head_dim=arg(args, "qk_pos_emb_head_dim") if mla else None,
        v_head_dim=arg(args, "v_head_dim") if mla else None,
        mtp_num_layers=int(arg(args, "mtp_num_layers", default=0) or 0),
    )
    if not experts:  # a dense model: router settings mean nothing, keep the defaults
        fields = {k: v for k, v in fields.items() if not k.startswith("moe_")}
    return fields


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """Read the model-defining Megatron-LM args (0.12 to 0.19 spellings)."""
    missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads") if arg(args, n) is None]
    if missing:
        raise DistconvError(f"checkpoint args lack {', '.join(missing)}: cannot describe the model")
    heads = int(args.num_attention_heads)
    hidden = int(args.hidden_size)
    groups = int(args.num_query_groups) if arg(args, "group_query_attention", default=False) else heads
    padded = arg(args, "padded_vocab_size")
    if padded is None:
        raise DistconvError("checkpoint args lack padded_vocab_size")
    window = arg(args, "window_size")
    dtype = torch.bfloat16 if arg(args, "bf16", default=False) else (
        torch.float16 if arg(args, "fp16", default=False) else torch.float32
    )
    return ModelSpec(
        num_layers=int(args.num_layers),
        hidden_size=hidden,
        ffn_hidden_size=int(arg(args, "ffn_hidden_size", default=4 * hidden)),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=int(arg(args, "kv_channels", default=hidden // heads)),
        padded_vocab_size=int(padded),
        max_position_embeddings=int(arg(args, "max_position_embeddings", "seq_length")),
        normalization=arg(args, "normalization", default="LayerNorm"),
        norm_epsilon=float(arg(args, "norm_epsilon", "layernorm_epsilon", default=1e-5)),
        gated_mlp=bool(arg(args, "swiglu", default=False)),
        activation=_activation(args),
        add_bias_linear=bool(arg(args, "add_bias_linear", default=True)),
        add_qkv_bias=bool(arg(args, "add_qkv_bias", default=False)),
        qk_layernorm=bool(arg(args, "qk_layernorm", default=False)),
        tie_embeddings=not arg(args, "untie_embeddings_and_output_weights", default=False),
        # before position_embedding_type existed (mid-2023), RoPE was --use-rotary-position-embeddings
        position_embedding=arg(args, "position_embedding_type", default="rope" if arg(args, "use_rotary_position_embeddings", default=False) else "learned_absolute"),
        rotary_base=float(arg(args, "rotary_base", default=10000)),
        rotary_percent=float(arg(args, "rotary_percent", default=1.0)),
        rotary_interleaved=bool(arg(args, "rotary_interleaved", default=False)),
        rope_scaling=_rope_scaling(args),
        window_size=tuple(window) if window else None,
        zero_centered_gamma=bool(arg(args, "layernorm_zero_centered_gamma", "apply_layernorm_1p", default=False)),
        init_std=float(arg(args, "init_method_std", default=0.02)),
        train_dtype=dtype,
        **_moe_and_mla(args, int(args.num_layers)),
    )
