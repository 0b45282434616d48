"""Qwen3: Llama plus per-head RMSNorm on queries and keys, and an explicit head_dim."""

from __future__ import annotations

from distconv.families.base import Family, Rule
from distconv.families.llama import CONFIG_FIELDS, REQUIRES, RULES, H, L, spec_fields

QWEN3 = Family(
    architecture="Qwen3ForCausalLM",
    config_class="Qwen3Config",
    rules=RULES + (
        Rule(L + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight"),
        Rule(L + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight"),
    ),
    requires={**REQUIRES, "qk_layernorm": True},
    config_fields=CONFIG_FIELDS + (("attention_bias", lambda s: False),),
    detect=lambda spec: spec.qk_layernorm,
    spec_fields=spec_fields(
        qk_layernorm=lambda c: True,
        window_size=lambda c: (c.sliding_window - 1, 0) if getattr(c, "use_sliding_window", False) else None,
    ),
)
