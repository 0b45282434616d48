"""GLM-4.5 (``Glm4MoeForCausalLM``): GQA attention, sigmoid-routed experts, shared experts.

Attention is Llama's with optional q/k/v biases (``attention_bias`` <-> ``add_qkv_bias``; never
an o_proj or MLP bias) and optional per-head q/k RMSNorm before the rotary embedding
(``use_qk_norm`` <-> ``qk_layernorm``), with the norms' epsilon ``rms_norm_eps``. Partial RoPE:
``partial_rotary_factor`` <-> ``rotary_percent``. Both sides rotate the first
``int(head_dim * factor)`` dims of each head, rotate-half (not interleaved), with inverse
frequencies ``base ** (-arange(0, dim, 2) / dim)`` over that rotary dim, and pass the rest
through (transformers ``apply_rotary_pos_emb``, megatron-core ``_apply_rotary_pos_emb_bshd``):
the weights copy unchanged. transformers defaults the factor to 0.5, so it is always written.

The router is ``moe.SIGMOID_*``'s (DeepSeek-V3's); the shared experts are one ungated MLP of
``n_shared_experts * moe_intermediate_size``, added to the routed output. Dense layers come first
(``first_k_dense_replace``). MTP layers convert both ways (``moe.MTP_RULES``); the export always
writes ``num_nextn_predict_layers`` (transformers defaults it to 1).
"""

from __future__ import annotations

from distconv.families.base import QKV, Family, Rule, _hf_value
from distconv.families.llama import RULES, H, L, spec_fields
from distconv.families.moe import (
    SIGMOID_FIELDS, SIGMOID_REQUIRES, SIGMOID_RULES, SIGMOID_SPEC, fields, with_fields, with_mtp,
)

A = L + "self_attention."
HA = H + "self_attn."


GLM4_MOE = Family(
    architecture="Glm4MoeForCausalLM",
    config_class="Glm4MoeConfig",
    rules=with_mtp(RULES + SIGMOID_RULES + (
        Rule(A + "linear_qkv.bias", (HA + "q_proj.bias", HA + "k_proj.bias", HA + "v_proj.bias"), QKV),
        Rule(A + "q_layernorm.weight", HA + "q_norm.weight"),
        Rule(A + "k_layernorm.weight", HA + "k_norm.weight"),
    )),
    requires={
        **SIGMOID_REQUIRES,
        "add_qkv_bias": lambda b: True,  # HF attention_bias
        "qk_layernorm": lambda b: True,  # HF use_qk_norm
        "rotary_percent": lambda p: 0.0 < p <= 1.0,  # HF partial_rotary_factor
        "rope_scaling": None,  # RoPE scaling with partial RoPE is not proven: refused
    },
    config_fields=fields() + SIGMOID_FIELDS + (
        ("partial_rotary_factor", lambda s: s.rotary_percent),
        ("attention_bias", lambda s: s.add_qkv_bias),
        ("use_qk_norm", lambda s: s.qk_layernorm),
    ),
    detect=lambda spec: bool(spec.num_experts) and spec.moe_score_function == "sigmoid",
    spec_fields=with_fields(
        spec_fields(
            add_bias_linear=lambda c: False,  # attention_bias is q/k/v only
            add_qkv_bias=lambda c: bool(c.attention_bias),
            qk_layernorm=lambda c: bool(c.use_qk_norm),
            rotary_percent=lambda c: float(_hf_value(c, "partial_rotary_factor")),
        ),
        **SIGMOID_SPEC,
    ),
)
