"""Mixtral: Llama attention, every layer a top-k MoE (softmax, renormalised), no shared expert."""

from __future__ import annotations

from distconv.families.base import Family
from distconv.families.llama import RULES, spec_fields
from distconv.families.moe import SOFTMAX_REQUIRES, expert_rules, fields, with_fields

MIXTRAL = Family(
    architecture="MixtralForCausalLM",
    config_class="MixtralConfig",
    rules=RULES + expert_rules("block_sparse_moe.", "w1.weight", "w3.weight", "w2.weight"),
    requires={
        **SOFTMAX_REQUIRES,
        "moe_layers": all,
        "moe_pre_softmax": False,  # HF always renormalises the top-k weights
        "moe_shared_ffn_hidden_size": None,
    },
    config_fields=fields(drop=("intermediate_size",)) + (
        ("intermediate_size", lambda s: s.moe_ffn_hidden_size),
        ("num_local_experts", lambda s: s.num_experts),
        ("num_experts_per_tok", lambda s: s.moe_topk),
    ),
    detect=lambda spec: bool(spec.num_experts),
    spec_fields=with_fields(
        spec_fields(window_size=lambda c: (c.sliding_window - 1, 0) if c.sliding_window else None),
        num_experts=lambda c: c.num_local_experts,
        moe_layers=lambda c: (True,) * c.num_hidden_layers,
        moe_ffn_hidden_size=lambda c: c.intermediate_size,
        moe_topk=lambda c: c.num_experts_per_tok,
    ),
)
