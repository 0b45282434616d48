"""What Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 and GLM-4.5 share: expert tables and router semantics.

megatron-core's top-k router (``moe_utils.topk_routing_with_score_function``) and the HF
routers agree exactly in these cases:

- softmax, ``moe_router_pre_softmax=False``: top-k of the logits, softmax over the k. That is
  HF's softmax over all experts, top-k, renormalised (Mixtral; Qwen ``norm_topk_prob=True``).
- softmax, ``moe_router_pre_softmax=True``: softmax over all experts, then top-k, no
  renormalisation (Qwen ``norm_topk_prob=False``).
- sigmoid with ``expert_bias`` (DeepSeek-V3, GLM-4.5): selection on sigmoid + bias, weights are the
  sigmoid scores, renormalised when k > 1, times ``moe_router_topk_scaling_factor``.

Token dropping (a capacity factor) and Sinkhorn routing have no HF equivalent.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

from distconv.families.base import GATE_UP, VOCAB, Rule
from distconv.families.llama import CONFIG_FIELDS, REQUIRES, H, L
from distconv.spec import ModelSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig

E = "mlp.experts.{expert}."


def expert_rules(hf_moe: str, gate: str, up: str, down: str, router: str = "gate") -> tuple[Rule, ...]:
    """Router and routed experts: ``hf_moe`` is the HF MoE block (``mlp.``), then the expert names."""
    return (
        Rule(L + "mlp.router.weight", H + hf_moe + router + ".weight"),
        Rule(L + E + "linear_fc1.weight", (H + hf_moe + "experts.{expert}." + gate, H + hf_moe + "experts.{expert}." + up), GATE_UP, fp8=True),
        Rule(L + E + "linear_fc2.weight", H + hf_moe + "experts.{expert}." + down, fp8=True),
    )


def shared_expert_rules(hf_shared: str) -> tuple[Rule, ...]:
    """The shared expert, an ordinary gated MLP, under ``mlp.{hf_shared}``."""
    return (
        Rule(L + "mlp.shared_experts.linear_fc1.weight", (H + f"mlp.{hf_shared}.gate_proj.weight", H + f"mlp.{hf_shared}.up_proj.weight"), GATE_UP, fp8=True),
        Rule(L + "mlp.shared_experts.linear_fc2.weight", H + f"mlp.{hf_shared}.down_proj.weight", fp8=True),
    )


def _no_scaling(factor: float | None) -> bool:
    return factor is None or factor == 1.0


# Every MoE family: experts present, routing HF can reproduce, no MLA or MTP unless overridden.
MOE_REQUIRES: dict[str, Any] = {
    **REQUIRES,
    "num_experts": lambda n: bool(n),
    "moe_capacity_factor": None,
    "moe_routing_type": lambda t: "sinkhorn" not in t,
    "multi_latent_attention": False,
    "mtp_num_layers": 0,
}

# softmax routers (Mixtral, Qwen): no expert bias, no groups, no scaling
SOFTMAX_REQUIRES: dict[str, Any] = {
    **MOE_REQUIRES,
    "moe_score_function": "softmax",
    "moe_expert_bias": False,
    "moe_group_topk": None,
    "moe_scaling_factor": _no_scaling,
}


def dense_layers(spec: ModelSpec) -> list[int]:
    return [i for i, moe in enumerate(spec.moe_layers) if not moe]


def leading_dense(moe_layers: tuple[bool, ...]) -> bool:
    """HF's ``first_k_dense_replace``: dense layers first, MoE after."""
    return list(moe_layers) == sorted(moe_layers)


# sigmoid routers with a correction bias, groups and shared experts (DeepSeek-V3, GLM-4.5). HF
# ranks a group by its top-2 expert scores, megatron-core by its top ``moe_router_topk /
# moe_router_group_topk``: the two agree when that is 2 (or with no groups). The bias is float32 on
# both sides in every model dtype; transformers also saves the router weight float32.
SIGMOID_RULES = (
    tuple(dataclasses.replace(r, hf_float32=True) if r.megatron == L + "mlp.router.weight" else r
          for r in expert_rules("mlp.", "gate_proj.weight", "up_proj.weight", "down_proj.weight"))
    + shared_expert_rules("shared_experts")
    + (Rule(L + "mlp.router.expert_bias", H + "mlp.gate.e_score_correction_bias", float32=True),)
)

SIGMOID_REQUIRES: dict[str, Any] = {
    **MOE_REQUIRES,
    "moe_layers": leading_dense,
    "moe_score_function": "sigmoid",
    "moe_expert_bias": True,  # HF always adds e_score_correction_bias
    "moe_group_score_topk": lambda k: k in (None, 2),
    "moe_shared_experts": lambda n: bool(n),
    "moe_shared_gate": False,
    "mtp_num_layers": lambda n: n >= 0,  # any number: MTP_RULES convert them
    "mtp_conflict": None,
}

# the sigmoid router's groups and scaling, as DeepSeek-V3's config names them (Nemotron-H's too)
SIGMOID_ROUTER_FIELDS: tuple[tuple[str, Callable[[ModelSpec], Any]], ...] = (
    # megatron-core limits routing to groups only when moe_router_group_topk is set
    ("n_group", lambda s: s.moe_num_groups if s.moe_group_topk else 1),
    ("topk_group", lambda s: s.moe_group_topk or 1),
    ("norm_topk_prob", lambda s: s.moe_topk > 1),  # megatron-core renormalises sigmoid scores when k > 1
    ("routed_scaling_factor", lambda s: float(s.moe_scaling_factor or 1.0)),
)

SIGMOID_FIELDS: tuple[tuple[str, Callable[[ModelSpec], Any]], ...] = (
    ("n_routed_experts", lambda s: s.num_experts),
    ("num_experts_per_tok", lambda s: s.moe_topk),
    ("moe_intermediate_size", lambda s: s.moe_ffn_hidden_size),
    ("n_shared_experts", lambda s: s.moe_shared_experts),
    ("first_k_dense_replace", lambda s: len(dense_layers(s))),
    *SIGMOID_ROUTER_FIELDS,
    ("num_mtp_layers", lambda s: s.mtp_num_layers),  # written as num_nextn_predict_layers
)


# Multi-token prediction (DeepSeek-V3, GLM-4.5), as DeepSeek's releases lay it out: megatron-core's
# ``mtp.layers.{m}`` is HF's ``model.layers.{num_layers + m}``, which the engine names
# ``decoder.layers.{num_layers + m}``. Its own norms, projection and final norm map here; the decoder
# layer inside it maps by the family's layer rules; HF repeats the embedding and output head in it.
MTP_RULES = (
    Rule(L + "enorm.weight", H + "enorm.weight"),
    Rule(L + "hnorm.weight", H + "hnorm.weight"),
    Rule(L + "eh_proj.weight", H + "eh_proj.weight"),  # high precision in the FP8 releases
    Rule(L + "final_layernorm.weight", H + "shared_head.norm.weight"),
    Rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", VOCAB, mtp_copy=H + "embed_tokens.weight"),
    Rule("output_layer.weight", "lm_head.weight", VOCAB, mtp_copy=H + "shared_head.head.weight"),
)


def with_mtp(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """``rules`` with ``MTP_RULES`` (whose embedding and output rules replace the plain ones)."""
    replaced = {r.megatron for r in MTP_RULES if r.mtp_copy}
    return MTP_RULES + tuple(r for r in rules if r.megatron not in replaced)


def _groups(c: PretrainedConfig) -> int | None:
    """megatron-core's ``moe_router_num_groups``: none for HF's single group."""
    return c.n_group if c.n_group > 1 else None


# import: the sigmoid router (``SIGMOID_ROUTER_FIELDS`` read back), for DeepSeek-V3's and Nemotron-H's configs
SIGMOID_ROUTER_SPEC: dict[str, Callable[[PretrainedConfig], Any]] = dict(
    moe_topk=lambda c: c.num_experts_per_tok,
    moe_score_function=lambda c: "sigmoid",
    moe_expert_bias=lambda c: True,
    moe_scaling_factor=lambda c: float(c.routed_scaling_factor),
    moe_num_groups=_groups,
    moe_group_topk=lambda c: c.topk_group if _groups(c) else None,
)

# import: the sigmoid router, shared experts and leading dense layers of DeepSeek-V3 and GLM-4.5 configs
SIGMOID_SPEC: dict[str, Callable[[PretrainedConfig], Any]] = dict(
    num_experts=lambda c: c.n_routed_experts,
    moe_layers=lambda c: tuple(i >= c.first_k_dense_replace for i in range(c.num_hidden_layers)),
    moe_ffn_hidden_size=lambda c: c.moe_intermediate_size,
    **SIGMOID_ROUTER_SPEC,
    moe_shared_ffn_hidden_size=lambda c: c.n_shared_experts * c.moe_intermediate_size or None,
    mtp_num_layers=lambda c: c.num_mtp_layers or 0,
)


def head_dim_if_needed(spec: ModelSpec) -> int | None:
    """``head_dim`` only where it differs from hidden/heads (configs without the field)."""
    return None if spec.head_dim * spec.num_attention_heads == spec.hidden_size else spec.head_dim


def fields(drop: tuple[str, ...] = ()) -> tuple[tuple[str, Callable[[ModelSpec], Any]], ...]:
    """Llama's config fields without ``drop``."""
    return tuple((name, fn) for name, fn in CONFIG_FIELDS if name not in drop)


QWEN_MOE_FIELDS = fields(drop=("head_dim",)) + (
    ("head_dim", head_dim_if_needed),
    ("num_experts", lambda s: s.num_experts),
    ("num_experts_per_tok", lambda s: s.moe_topk),
    ("moe_intermediate_size", lambda s: s.moe_ffn_hidden_size),
    ("norm_topk_prob", lambda s: not s.moe_pre_softmax),
    ("decoder_sparse_step", lambda s: 1),
    ("mlp_only_layers", dense_layers),
)


# ---- import: ModelSpec fields <- HF config ----------------------------------------------------

def with_fields(base: tuple, **extra: Callable[[PretrainedConfig], Any]) -> tuple:
    """Spec fields ``base`` (a relative of Llama's) with fields added (MoE fields, not in Llama's)."""
    return base + tuple(extra.items())


def qwen_moe_layers(c: PretrainedConfig) -> tuple[bool, ...]:
    """HF Qwen-MoE: a layer is sparse unless in ``mlp_only_layers``, every ``decoder_sparse_step``-th."""
    dense = set(c.mlp_only_layers or ())
    return tuple(i not in dense and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0
                 for i in range(c.num_hidden_layers))


# the router: Qwen's norm_topk_prob renormalises the top-k weights (megatron-core: no pre-softmax)
QWEN_MOE_SPEC = dict(
    num_experts=lambda c: c.num_experts,
    moe_layers=qwen_moe_layers,
    moe_ffn_hidden_size=lambda c: c.moe_intermediate_size,
    moe_topk=lambda c: c.num_experts_per_tok,
    moe_pre_softmax=lambda c: not c.norm_topk_prob,
)
# decoder_sparse_step=2 and mlp_only_layers=[0, 2] (say) mean the same layers
QWEN_MOE_SPELLED_BY = (("moe_layers", ("decoder_sparse_step", "mlp_only_layers")),)
