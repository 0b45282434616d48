"""Qwen2: Llama plus biases on q/k/v (and none on o_proj or the MLP)."""

from __future__ import annotations

from distconv.families.base import QKV, Family, Rule
from distconv.families.llama import CONFIG_FIELDS, REQUIRES, RULES, H, L, spec_fields

QWEN2 = Family(
    architecture="Qwen2ForCausalLM",
    config_class="Qwen2Config",
    rules=RULES + (
        Rule(L + "self_attention.linear_qkv.bias", (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"), QKV),
    ),
    requires={**REQUIRES, "add_qkv_bias": True},
    config_fields=CONFIG_FIELDS,
    detect=lambda spec: spec.add_qkv_bias,
    spec_fields=spec_fields(
        add_bias_linear=lambda c: False,
        add_qkv_bias=lambda c: True,
        window_size=lambda c: (c.sliding_window - 1, 0) if getattr(c, "use_sliding_window", False) else None,
    ),
)
