"""A version-independent description of the model (read from Megatron-LM's args by ``megatron.args``,
from an HF config by a family), and the weight dtypes a user may name. No I/O."""

from __future__ import annotations

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
    window_size: tuple[int, int] | None  # (left, right) tokens each query sees besides itself
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
    # gated attention (Qwen3-Next): attention output times sigmoid(gate), the gate rows in linear_qkv
    attention_output_gate: bool = False
    # megatron-core's ``experimental_attention_variant``: None, "gated_delta_net" (Qwen3-Next's
    # linear attention, in the layers ``linear_attention`` marks; full attention in the others), or
    # "dsa" (DeepSeek-V3.2's and GLM-5's indexer in every MLA layer)
    experimental_attention_variant: str | None = None
    linear_attention: tuple[bool, ...] = ()  # per layer: gated delta net (True) or full attention
    linear_conv_kernel_dim: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_num_key_heads: int | None = None
    linear_num_value_heads: int | None = None
    # experimental_attention_variant "dsa" (DeepSeek sparse attention: MLA plus a top-k indexer of
    # ``dsa_indexer_n_heads`` heads of ``dsa_indexer_head_dim``, each query attending to the
    # ``dsa_indexer_topk`` keys it scores highest)
    dsa_indexer_n_heads: int | None = None
    dsa_indexer_head_dim: int | None = None
    dsa_indexer_topk: int | None = None
    # attention sinks: "vanilla" softmax, or a "learnable" per-head logit added to every row's
    # denominator (megatron-core's ``softmax_offset``, gpt-oss's ``sinks``); "off-by-one" adds 1
    softmax_type: str = "vanilla"
    # per layer: whether ``window_size`` applies (megatron-core's ``window_attn_skip_freq``); None:
    # every layer (or none, without a window)
    window_layers: tuple[bool, ...] | None = None
    # the gated MLP's clamp (gate at most c, the linear half within [-c, c]) and the offset added
    # to its linear half: ``act(min(g, c)) * (clamp(u, -c, c) + offset)``
    activation_clamp: float | None = None
    glu_linear_offset: float = 0.0
    # megatron-core's hybrid model (``MambaModel``; ``HybridModel`` from 0.18): one symbol per layer,
    # "M" a Mamba-2 mixer, "*" attention, "-" an MLP, "E" MoE (``hybrid_override_pattern``); "" for GPT
    hybrid_pattern: str = ""
    mamba_num_heads: int | None = None
    mamba_head_dim: int | None = None
    mamba_num_groups: int | None = None
    mamba_state_dim: int | None = None

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

    def is_linear_attention(self, layer: int) -> bool:
        """Whether layer ``layer`` is a gated delta net (linear attention) rather than full attention."""
        return bool(self.linear_attention) and self.linear_attention[min(layer, self.num_layers - 1)]

    def layer_kind(self, layer: int | None) -> str | None:
        """A hybrid model's symbol for layer ``layer`` ("M", "*", "-", "E"); None outside hybrid models."""
        if not self.hybrid_pattern or layer is None:
            return None
        return self.hybrid_pattern[min(layer, self.num_layers - 1)]

    @property
    def routing(self) -> str | None:
        """An MoE layer's routing in words (None without experts): the score function, then an expert
        bias and a shared expert (gated or not) where the model has them."""
        if not self.num_experts:
            return None
        parts = [self.moe_score_function] + ["expert bias"] * self.moe_expert_bias
        if self.moe_shared_ffn_hidden_size:
            parts.append("gated shared expert" if self.moe_shared_gate else "shared expert")
        return ", ".join(parts)

    @property
    def mamba_inner(self) -> int:
        """The Mamba mixer's inner width (heads x head size): z, x and the gated norm's rows."""
        return (self.mamba_num_heads or 0) * (self.mamba_head_dim or 0)

    @property
    def mtp_conflict(self) -> str | None:
        """Why the MTP layers have no HF form (HF's MTP layers are MoE and carry their own output head)."""
        if not self.mtp_num_layers:
            return None
        if self.tie_embeddings:
            return "MTP layers with tied embeddings"
        if self.num_experts and not self.is_moe(self.num_layers):
            return "MTP layers without experts"
        if self.is_linear_attention(self.num_layers):  # HF's (Qwen3-Next's) MTP layer is full attention
            return "MTP layers after a gated delta net layer"
        return None

    def windowed(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) attends through the sliding window."""
        return self.window_size is not None and (self.window_layers is None or self.window_layers[layer])

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
