"""Qwen2-MoE: Qwen2 attention (optional q/k/v bias), routed experts plus one gated shared expert."""

from __future__ import annotations

from distconv.families.base import QKV, Family, Rule
from distconv.families.llama import RULES, H, L, spec_fields
from distconv.families.moe import (
    QWEN_MOE_FIELDS, QWEN_MOE_SPEC, QWEN_MOE_SPELLED_BY, SOFTMAX_REQUIRES, expert_rules, shared_expert_rules, with_fields,
)

QWEN2_MOE = Family(
    architecture="Qwen2MoeForCausalLM",
    config_class="Qwen2MoeConfig",
    rules=RULES + expert_rules("mlp.", "gate_proj.weight", "up_proj.weight", "down_proj.weight")
    + shared_expert_rules("shared_expert") + (
        Rule(L + "mlp.shared_experts.gate_weight", H + "mlp.shared_expert_gate.weight"),
        Rule(L + "self_attention.linear_qkv.bias", (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"), QKV),
    ),
    requires={
        **SOFTMAX_REQUIRES,
        "add_qkv_bias": lambda b: True,  # HF qkv_bias
        "moe_shared_ffn_hidden_size": lambda n: bool(n),
        "moe_shared_gate": True,  # HF always gates the shared expert with a sigmoid
    },
    config_fields=QWEN_MOE_FIELDS + (
        ("shared_expert_intermediate_size", lambda s: s.moe_shared_ffn_hidden_size),
        ("qkv_bias", lambda s: s.add_qkv_bias),
    ),
    detect=lambda spec: bool(spec.num_experts and spec.moe_shared_ffn_hidden_size),
    spec_fields=with_fields(
        spec_fields(
            add_bias_linear=lambda c: False,
            add_qkv_bias=lambda c: bool(c.qkv_bias),
            window_size=lambda c: (c.sliding_window - 1, 0) if getattr(c, "use_sliding_window", False) else None,
        ),
        **QWEN_MOE_SPEC,
        moe_shared_ffn_hidden_size=lambda c: c.shared_expert_intermediate_size,
        moe_shared_gate=lambda c: True,
    ),
    spelled_by=QWEN_MOE_SPELLED_BY,
)
