"""Qwen3-MoE: Qwen3 attention (q/k RMSNorm, explicit head_dim), routed experts, no shared expert."""

from __future__ import annotations

from distconv.families.base import Family
from distconv.families.moe import QWEN_MOE_FIELDS, QWEN_MOE_SPEC, QWEN_MOE_SPELLED_BY, SOFTMAX_REQUIRES, expert_rules, with_fields
from distconv.families.qwen3 import QWEN3

QWEN3_MOE = Family(
    architecture="Qwen3MoeForCausalLM",
    config_class="Qwen3MoeConfig",
    rules=QWEN3.rules + expert_rules("mlp.", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    requires={**SOFTMAX_REQUIRES, "qk_layernorm": True, "moe_shared_ffn_hidden_size": None},
    config_fields=QWEN_MOE_FIELDS + (("attention_bias", lambda s: False),),
    detect=lambda spec: bool(spec.num_experts and spec.qk_layernorm),
    spec_fields=with_fields(QWEN3.spec_fields, **QWEN_MOE_SPEC),
    spelled_by=QWEN_MOE_SPELLED_BY,
)
