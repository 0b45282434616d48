"""Nemotron-H (``NemotronHForCausalLM``): megatron-core's hybrid model (``MambaModel``, ``HybridModel``
from 0.18), a stack of Mamba-2 mixers ("M"), attention without RoPE ("*"), squared-ReLU MLPs ("-")
and MoE layers ("E": a sigmoid router with an expert bias, non-gated squared-ReLU experts, a
shared expert), in the order of Megatron-LM's ``hybrid_override_pattern`` <-> HF ``layers_block_type``.

Which side stores what:

- **Mamba mixer input projection.** megatron-core saves ``in_proj.weight.{z, x, B, C, dt}`` as
  tensors of their own, each split over TP on its rows (``megatron.catalogue``); HF's
  ``mixer.in_proj.weight`` is their concatenation ``[z; x; B; C; dt]`` (TP1's in-memory rows).
  Likewise ``conv1d.{weight, bias}.{x, B, C}`` <-> ``mixer.conv1d.{weight, bias}``. A_log, D,
  dt_bias and the gated norm's weight are the same tensors on both sides (A = -exp(A_log), D per
  head, the norm's plain gamma).
- **norms.** Each HF layer has one ``norm.weight``: the input norm fused into a Mamba layer's
  ``in_proj`` or an attention layer's ``linear_qkv``, the one fused into an MLP layer's
  ``linear_fc1``, an MoE layer's ``pre_mlp_layernorm``. All plain gamma (no zero-centred gamma:
  the Mamba mixer's gated norm has none in megatron-core). The final norm is ``decoder.final_norm``
  <-> ``norm_f``.
- **MoE.** The router weight and ``e_score_correction_bias`` (megatron-core's ``expert_bias``) are
  float32 in HF folders; experts are per expert on disk (``experts.{e}.up_proj``/``down_proj``).

What one side computes and the other cannot: megatron-core's Mamba gated norm uses eps 1e-5 whatever
``layernorm_epsilon`` says, transformers' uses ``layer_norm_epsilon`` for it too, so only models
with eps 1e-5 (every Nemotron-H release) convert; transformers clamps the Mamba step
``softplus(dt + dt_bias)`` at ``time_step_min`` (1e-3), megatron-core and vLLM do not: the two differ
only where a step is below 1e-3 (``notes``). MoE latent projections (``moe_latent_size``) and MTP
layers are not converted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from distconv.families.base import QKV, VOCAB, Concat, Family, Rule
from distconv.families.llama import REQUIRES as LLAMA_REQUIRES
from distconv.families.llama import spec_fields
from distconv.families.moe import SIGMOID_ROUTER_FIELDS, SIGMOID_ROUTER_SPEC
from distconv.spec import ModelSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig

L = "decoder.layers.{layer}."
B = "backbone.layers.{layer}."
MX = L + "mixer."
HM = B + "mixer."

MIXER_NORM_EPS = 1e-5  # megatron-core's ``MambaMixer`` builds its gated norm with this eps, always
CONV_KERNEL = 4  # megatron-core's ``MambaMixer`` d_conv: no arg changes it

# megatron-core's pattern symbols <-> HF ``layers_block_type``
BLOCK_TYPES = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
HF_BLOCK_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_FROM_HF = {**{v: k for k, v in BLOCK_TYPES.items()}, **{v: k for k, v in HF_BLOCK_TYPES.items()}}


def _in_proj_rows(s: ModelSpec) -> tuple[int, ...]:
    bc = s.mamba_num_groups * s.mamba_state_dim
    return s.mamba_inner, s.mamba_inner, bc, bc, s.mamba_num_heads


def _conv_rows(s: ModelSpec) -> tuple[int, ...]:
    return _in_proj_rows(s)[1:4]


def _components(name: str, *parts: str) -> tuple[str, tuple[str, ...]]:
    """A joint rule's first Megatron name and the others: ``name.{part}`` for each part."""
    names = tuple(f"{name}.{p}" for p in parts)
    return names[0], names[1:]


_IN_PROJ, _IN_PROJ_REST = _components(MX + "in_proj.weight", "z", "x", "B", "C", "dt")
_CONV_W, _CONV_W_REST = _components(MX + "conv1d.weight", "x", "B", "C")
_CONV_B, _CONV_B_REST = _components(MX + "conv1d.bias", "x", "B", "C")

RULES = (
    Rule("embedding.word_embeddings.weight", "backbone.embeddings.weight", VOCAB),
    Rule("output_layer.weight", "lm_head.weight", VOCAB),
    Rule("decoder.final_norm.weight", "backbone.norm_f.weight"),
    # each layer's one norm: the input norm of Mamba and attention layers, the pre-MLP norm of MLP and MoE layers
    Rule(L + "self_attention.linear_qkv.layer_norm_weight", B + "norm.weight", kinds="M*"),
    Rule(L + "mlp.linear_fc1.layer_norm_weight", B + "norm.weight", kinds="-E"),
    # the Mamba-2 mixer
    Rule(_IN_PROJ, HM + "in_proj.weight", Concat(_in_proj_rows), joint=_IN_PROJ_REST),
    Rule(_CONV_W, HM + "conv1d.weight", Concat(_conv_rows), joint=_CONV_W_REST),
    Rule(_CONV_B, HM + "conv1d.bias", Concat(_conv_rows), joint=_CONV_B_REST),
    Rule(MX + "A_log", HM + "A_log"),
    Rule(MX + "D", HM + "D"),
    Rule(MX + "dt_bias", HM + "dt_bias"),
    Rule(MX + "norm.weight", HM + "norm.weight"),
    Rule(MX + "out_proj.weight", HM + "out_proj.weight"),
    # attention (no RoPE)
    Rule(L + "self_attention.linear_qkv.weight", (HM + "q_proj.weight", HM + "k_proj.weight", HM + "v_proj.weight"), QKV),
    Rule(L + "self_attention.linear_proj.weight", HM + "o_proj.weight"),
    # the MLP (squared ReLU, not gated)
    Rule(L + "mlp.linear_fc1.weight", HM + "up_proj.weight"),
    Rule(L + "mlp.linear_fc2.weight", HM + "down_proj.weight"),
    # MoE: the router (float32 in HF folders), routed experts, the shared expert
    Rule(L + "mlp.router.weight", HM + "gate.weight", hf_float32=True),
    Rule(L + "mlp.router.expert_bias", HM + "gate.e_score_correction_bias", float32=True),
    Rule(L + "mlp.experts.{expert}.linear_fc1.weight", HM + "experts.{expert}.up_proj.weight"),
    Rule(L + "mlp.experts.{expert}.linear_fc2.weight", HM + "experts.{expert}.down_proj.weight"),
    Rule(L + "mlp.shared_experts.linear_fc1.weight", HM + "shared_experts.up_proj.weight"),
    Rule(L + "mlp.shared_experts.linear_fc2.weight", HM + "shared_experts.down_proj.weight"),
)

REQUIRES: dict[str, Any] = {
    **LLAMA_REQUIRES,
    "hybrid_pattern": lambda p: bool(p),
    "gated_mlp": False,
    "activation": "relu2",
    "position_embedding": "none",
    "norm_epsilon": MIXER_NORM_EPS,  # transformers' Mamba gated norm takes layer_norm_epsilon, megatron-core's 1e-5
    "num_experts": lambda n: True,  # MoE layers where the pattern has them
    # HF's MoE layer: sigmoid scores with e_score_correction_bias, a shared expert without gate
    "routing": lambda r: r in (None, "sigmoid, expert bias, shared expert"),
    "moe_group_score_topk": lambda k: k in (None, 2),  # HF ranks a group by its top-2 scores
    "moe_capacity_factor": None,
    "moe_routing_type": lambda t: "sinkhorn" not in t,
}


def _block_types(spec: ModelSpec) -> list[str]:
    return [HF_BLOCK_TYPES[c] for c in spec.hybrid_pattern]


def _moe(fn: Callable[[ModelSpec], Any]) -> Callable[[ModelSpec], Any]:
    """An MoE config field: None (transformers' default, unused) in a model without MoE layers."""
    return lambda s: fn(s) if s.num_experts else None


CONFIG_FIELDS: tuple[tuple[str, Callable[[ModelSpec], Any]], ...] = (
    ("vocab_size", lambda s: s.vocab_size or s.padded_vocab_size),
    ("hidden_size", lambda s: s.hidden_size),
    ("layers_block_type", _block_types),
    ("intermediate_size", lambda s: s.ffn_hidden_size),
    ("mlp_hidden_act", lambda s: s.activation),
    ("num_attention_heads", lambda s: s.num_attention_heads),
    ("num_key_value_heads", lambda s: s.num_query_groups),
    ("head_dim", lambda s: s.head_dim),
    ("attention_bias", lambda s: False),
    ("mlp_bias", lambda s: False),
    ("mamba_num_heads", lambda s: s.mamba_num_heads),
    ("mamba_head_dim", lambda s: s.mamba_head_dim),
    ("n_groups", lambda s: s.mamba_num_groups),
    ("ssm_state_size", lambda s: s.mamba_state_dim),
    ("conv_kernel", lambda s: CONV_KERNEL),
    ("use_conv_bias", lambda s: True),
    ("mamba_proj_bias", lambda s: False),
    ("mamba_hidden_act", lambda s: "silu"),
    ("layer_norm_epsilon", lambda s: s.norm_epsilon),
    ("max_position_embeddings", lambda s: s.max_position_embeddings),
    ("tie_word_embeddings", lambda s: s.tie_embeddings),
    ("initializer_range", lambda s: s.init_std),
    ("n_routed_experts", _moe(lambda s: s.num_experts)),
    ("num_experts_per_tok", _moe(lambda s: s.moe_topk)),
    ("moe_intermediate_size", _moe(lambda s: s.moe_ffn_hidden_size)),
    ("moe_shared_expert_intermediate_size", _moe(lambda s: s.moe_shared_ffn_hidden_size)),
    *((name, _moe(fn)) for name, fn in SIGMOID_ROUTER_FIELDS),
    ("moe_latent_size", lambda s: None),  # no latent projection (nullable: a config with one is refused)
    ("num_nextn_predict_layers", lambda s: 0),
)


def _pattern(c: PretrainedConfig) -> str:
    return "".join(_FROM_HF[t] for t in c.layers_block_type)


def _has_moe(c: PretrainedConfig) -> bool:
    return "E" in _pattern(c)


# the router fields of a model without MoE layers that are not None: megatron-core's defaults
DENSE_ROUTER = {"moe_topk": 1, "moe_score_function": "softmax", "moe_expert_bias": False}


def _if_moe(fn: Callable[[PretrainedConfig], Any], dense: Any = None) -> Callable[[PretrainedConfig], Any]:
    return lambda c: fn(c) if _has_moe(c) else dense


SPEC_FIELDS = spec_fields(
    num_layers=lambda c: len(c.layers_block_type),
    head_dim=lambda c: c.head_dim,
    norm_epsilon=lambda c: c.layer_norm_epsilon,
    gated_mlp=lambda c: False,
    activation=lambda c: c.mlp_hidden_act,
    add_bias_linear=lambda c: bool(c.attention_bias or c.mlp_bias or c.mamba_proj_bias),  # refused (REQUIRES)
    add_qkv_bias=lambda c: bool(c.attention_bias),
    position_embedding=lambda c: "none",
    rotary_base=lambda c: 10000.0,  # Megatron-LM's default; no RoPE
    rope_scaling=lambda c: None,
) + (
    ("hybrid_pattern", _pattern),
    ("mamba_num_heads", lambda c: c.mamba_num_heads),
    ("mamba_head_dim", lambda c: c.mamba_head_dim),
    ("mamba_num_groups", lambda c: c.n_groups),
    ("mamba_state_dim", lambda c: c.ssm_state_size),
    ("num_experts", _if_moe(lambda c: c.n_routed_experts)),
    ("moe_layers", lambda c: tuple(t == "E" for t in _pattern(c))),
    ("moe_ffn_hidden_size", _if_moe(lambda c: c.moe_intermediate_size)),
    *((name, _if_moe(fn, DENSE_ROUTER.get(name))) for name, fn in SIGMOID_ROUTER_SPEC.items()),
    ("moe_shared_ffn_hidden_size", _if_moe(lambda c: c.moe_shared_expert_intermediate_size)),
)


def _notes(spec: ModelSpec) -> list[str]:
    return ["transformers' NemotronH clamps each Mamba step softplus(dt + dt_bias) at time_step_min (1e-3); "
            "megatron-core and vLLM do not: their outputs differ wherever a step is smaller"]


NEMOTRON_H = Family(
    architecture="NemotronHForCausalLM",
    config_class="NemotronHConfig",
    rules=RULES,
    requires=REQUIRES,
    config_fields=CONFIG_FIELDS,
    detect=lambda spec: bool(spec.hybrid_pattern),
    spec_fields=SPEC_FIELDS,
    nullable=("moe_latent_size",),
    unconverted=(("mtp.", "MTP layers: transformers does not load them, and distconv does not convert them"),),
    notes=_notes,
)
