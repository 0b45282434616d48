"""Qwen3-Next (``Qwen3NextForCausalLM``) and Qwen3.5's text models (``Qwen3_5MoeForCausalLM``,
``Qwen3_5ForCausalLM``): gated delta net layers (``linear_attn``) between gated attention layers,
zero-centred RMSNorms, partial RoPE, and routed experts with a sigmoid-gated shared expert (dense
gated MLPs in every layer of the dense Qwen3.5).

megatron-core 0.16 builds these as a GPT model with ``experimental_attention_variant=
"gated_delta_net"``; ``linear_attention_freq`` <-> HF ``layer_types``. How the two formats lay out
the same tensors:

- **gated delta net input projection.** megatron-core saves ``in_proj.weight.{query, key, value,
  z, beta, alpha}`` as tensors of their own (``megatron.catalogue``). Qwen3-Next packs them per key
  head: ``in_proj_qkvz`` is, for each of the ``linear_num_key_heads`` groups, ``[q_h, k_h, v, z]``
  (v and z the group's ``linear_num_value_heads / linear_num_key_heads`` value heads), and
  ``in_proj_ba`` per group ``[b, a]``. Qwen3.5 keeps them flat: ``in_proj_qkv = [q; k; v]``,
  ``in_proj_z``, ``in_proj_b``, ``in_proj_a``. The conv1d's channels are ``[q; k; v]`` on both sides.
- **gated attention.** megatron-core's ``linear_qkv`` is, per query group, ``[q (its heads), gate
  (as many rows), k, v]``; HF's ``q_proj`` is, per head, ``[q_h; gate_h]``.
- **zero-centred norms.** The offset is part of each format, never of a tensor in memory: with
  ``layernorm_zero_centered_gamma`` (``--apply-layernorm-1p``) megatron-core stores ``gamma - 1`` for
  every norm, the gated delta net's output norm included; HF stores ``gamma - 1`` for its
  ``Qwen3NextRMSNorm`` / ``Qwen3_5MoeRMSNorm`` (input, post-attention, q/k and final norms) but plain
  ``gamma`` for the gated delta net's ``linear_attn.norm``. ``NormOffset`` adds or subtracts 1 only
  where the two differ (for a checkpoint without zero-centred gamma: every norm but that one), and
  returns new tensors (Megatron-Bridge #1929 added the offset in place, once per weight sync).
  Adding 1 rounds in the weights' dtype; weights in ``[0.5, 2]`` (``gamma - 1`` in ``[-0.5, 1]``) go
  and come back exactly.

The releases' one MTP layer (``mtp.*``, ``MTP_RULES``) converts both ways, for all three classes;
transformers does not load it, so its mapping is proven against megatron-core's MTP logits by the
published MTP formula on the exported tensors (the tests' ``mtp_reference``).

Qwen3.5 is written and read as its text models: ``Qwen3_5MoeForCausalLM`` (every layer MoE, top-k
renormalised), chosen by an HF config naming it (Qwen3-Next expresses every such model too), and
``Qwen3_5ForCausalLM`` (every layer a dense gated MLP, megatron-core's pre-MLP norm fused into
``linear_fc1``), the only class for a gated delta net model without experts, so chosen for one; the
multimodal releases (``Qwen3_5*ForConditionalGeneration``) are not read. Qwen3.5's multimodal RoPE
with text positions is the plain partial RoPE megatron-core applies.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import torch

from distconv.families.base import GATE_UP, VOCAB, Concat, Family, JointTransform, Rule, Tensors, Transform, _hf_value
from distconv.families.llama import REQUIRES as DENSE_REQUIRES
from distconv.families.llama import H, L, spec_fields
from distconv.families.moe import (
    QWEN_MOE_SPEC, QWEN_MOE_SPELLED_BY, SOFTMAX_REQUIRES, dense_layers, expert_rules, fields, shared_expert_rules,
    with_fields,
)
from distconv.spec import ModelSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig

A = L + "self_attention."
HA = H + "self_attn."
HL = H + "linear_attn."
GDN = "gated_delta_net"


class NormOffset(Transform):
    """A norm's weight where HF stores ``gamma - 1`` (``hf_zero_centered``) or ``gamma``, and the
    checkpoint ``gamma - 1`` (``spec.zero_centered_gamma``) or ``gamma``: 1 is added or subtracted
    where the two differ. Pure: a new tensor, the given one untouched."""

    def __init__(self, hf_zero_centered: bool) -> None:
        self.hf_zero_centered = hf_zero_centered

    def offset(self, spec: ModelSpec) -> int:
        """HF value minus Megatron value: -1, 0 or 1."""
        return int(spec.zero_centered_gamma) - int(self.hf_zero_centered)

    def export(self, t: torch.Tensor, spec: ModelSpec) -> Tensors:
        return (t + self.offset(spec),)

    def import_values(self, t: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
        return t - self.offset(spec)


class PerKeyHead(JointTransform):
    """One HF tensor made of several Megatron tensors (``rows(spec)`` rows each), grouped by the
    gated delta net's key heads: for each key head, each Megatron tensor's rows of that head in
    turn (Qwen3-Next's ``in_proj_qkvz``: ``[q_h, k_h, v_h*, z_h*]`` per key head h)."""

    def __init__(self, rows: Callable[[ModelSpec], tuple[int, ...]]) -> None:
        self.rows = rows

    def export(self, ts: Tensors, spec: ModelSpec) -> Tensors:
        g, rest = spec.linear_num_key_heads, ts[0].shape[1:]
        return (torch.cat([t.reshape(g, -1, *rest) for t in ts], dim=1).reshape(-1, *rest),)

    def import_(self, ts: Tensors, spec: ModelSpec) -> Tensors:
        g, (t,) = spec.linear_num_key_heads, ts
        rest = t.shape[1:]
        sizes = [rows // g for rows in self.rows(spec)]
        return tuple(p.reshape(-1, *rest) for p in t.reshape(g, sum(sizes), *rest).split(sizes, dim=1))


def _qkvz(s: ModelSpec) -> tuple[int, ...]:
    kd, vd = s.linear_num_key_heads * s.linear_key_head_dim, s.linear_num_value_heads * s.linear_value_head_dim
    return kd, kd, vd, vd


def _qkv(s: ModelSpec) -> tuple[int, ...]:
    return _qkvz(s)[:3]


def _ba(s: ModelSpec) -> tuple[int, ...]:
    return s.linear_num_value_heads, s.linear_num_value_heads


class GatedQKV(Transform):
    """megatron-core's ``linear_qkv`` with the output gate, per query group ``[q (r heads), gate
    (r heads), k, v]`` -> HF ``q_proj`` per head ``[q_h; gate_h]``, ``k_proj``, ``v_proj``."""

    def export(self, t: torch.Tensor, spec: ModelSpec) -> Tensors:
        ng, hd = spec.num_query_groups, spec.head_dim
        r, rest = spec.num_attention_heads // ng, t.shape[1:]
        w = t.reshape(ng, 2 * r + 2, hd, *rest)
        q = torch.stack([w[:, :r], w[:, r:2 * r]], dim=2)  # (groups, heads, [q, gate], hd, ...)
        return q.reshape(-1, *rest), w[:, 2 * r].reshape(-1, *rest), w[:, 2 * r + 1].reshape(-1, *rest)

    def import_(self, ts: Tensors, spec: ModelSpec) -> torch.Tensor:
        ng, hd = spec.num_query_groups, spec.head_dim
        r, (q, k, v) = spec.num_attention_heads // ng, ts
        rest = q.shape[1:]
        q = q.reshape(ng, r, 2, hd, *rest)
        grouped = (q[:, :, 0], q[:, :, 1], k.reshape(ng, 1, hd, *rest), v.reshape(ng, 1, hd, *rest))
        return torch.cat(grouped, dim=1).reshape(-1, *rest)


ZERO_CENTERED, PLAIN = NormOffset(hf_zero_centered=True), NormOffset(hf_zero_centered=False)
GATED_QKV = GatedQKV()


def _in_proj(*components: str) -> tuple[str, ...]:
    return tuple(f"{A}in_proj.weight.{c}" for c in components)


CONV = Rule(A + "conv1d.weight.query", HL + "conv1d.weight", Concat(_qkv),
            joint=(A + "conv1d.weight.key", A + "conv1d.weight.value"))

# every tensor of a dense model but the gated delta net's input projection (no block-wise FP8 layout: ``fp8`` unset)
DENSE_RULES = (
    Rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", VOCAB),
    Rule("output_layer.weight", "lm_head.weight", VOCAB),
    Rule(A + "linear_qkv.layer_norm_weight", H + "input_layernorm.weight", ZERO_CENTERED),
    Rule(A + "linear_qkv.weight", (HA + "q_proj.weight", HA + "k_proj.weight", HA + "v_proj.weight"), GATED_QKV),
    Rule(A + "linear_proj.weight", HA + "o_proj.weight"),
    Rule(A + "q_layernorm.weight", HA + "q_norm.weight", ZERO_CENTERED),
    Rule(A + "k_layernorm.weight", HA + "k_norm.weight", ZERO_CENTERED),
    Rule(L + "mlp.linear_fc1.layer_norm_weight", H + "post_attention_layernorm.weight", ZERO_CENTERED),
    Rule(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), GATE_UP),
    Rule(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight"),
    Rule("decoder.final_layernorm.weight", "model.norm.weight", ZERO_CENTERED),
    CONV,
    Rule(A + "A_log", HL + "A_log"),
    Rule(A + "dt_bias", HL + "dt_bias"),
    Rule(A + "out_norm.weight", HL + "norm.weight", PLAIN),
    Rule(A + "out_proj.weight", HL + "out_proj.weight"),
)
# ... and of a model with experts
COMMON_RULES = (
    DENSE_RULES
    + (Rule(L + "mlp.shared_experts.gate_weight", H + "mlp.shared_expert_gate.weight"),)
    + tuple(dataclasses.replace(r, fp8=False) for r in expert_rules("mlp.", "gate_proj.weight", "up_proj.weight",
                                                                    "down_proj.weight") + shared_expert_rules("shared_expert"))
)

# what every gated delta net model needs, with experts or without
GDN_REQUIRES: dict[str, Any] = {
    "experimental_attention_variant": GDN,
    "attention_output_gate": True,
    "qk_layernorm": True,
    "zero_centered_gamma": lambda z: True,  # either: NormOffset
    "rotary_percent": lambda p: 0.0 < p <= 1.0,  # partial_rotary_factor
    "rope_scaling": None,
}

REQUIRES: dict[str, Any] = {
    **SOFTMAX_REQUIRES,
    **GDN_REQUIRES,
    "moe_shared_ffn_hidden_size": lambda n: bool(n),
    "moe_shared_gate": True,  # HF always gates the shared expert with a sigmoid
}


def _layer_types(spec: ModelSpec) -> list[str]:
    return ["linear_attention" if linear else "full_attention" for linear in spec.linear_attention]


GDN_FIELDS = fields() + (
    ("partial_rotary_factor", lambda s: s.rotary_percent),
    ("attention_bias", lambda s: False),
    ("layer_types", _layer_types),
    ("linear_conv_kernel_dim", lambda s: s.linear_conv_kernel_dim),
    ("linear_key_head_dim", lambda s: s.linear_key_head_dim),
    ("linear_value_head_dim", lambda s: s.linear_value_head_dim),
    ("linear_num_key_heads", lambda s: s.linear_num_key_heads),
    ("linear_num_value_heads", lambda s: s.linear_num_value_heads),
)
CONFIG_FIELDS = GDN_FIELDS + (
    ("num_experts", lambda s: s.num_experts),
    ("num_experts_per_tok", lambda s: s.moe_topk),
    ("moe_intermediate_size", lambda s: s.moe_ffn_hidden_size),
    ("shared_expert_intermediate_size", lambda s: s.moe_shared_ffn_hidden_size),
)

DENSE_SPEC_FIELDS = with_fields(
    spec_fields(
        head_dim=lambda c: c.head_dim,
        add_bias_linear=lambda c: bool(c.attention_bias),  # q/k/v/o biases: refused (REQUIRES)
        add_qkv_bias=lambda c: bool(c.attention_bias),
        qk_layernorm=lambda c: True,
        rotary_percent=lambda c: float(_hf_value(c, "partial_rotary_factor")),
        zero_centered_gamma=lambda c: True,  # what Megatron-Bridge trains these models with
    ),
    attention_output_gate=lambda c: True,
    experimental_attention_variant=lambda c: GDN,
    linear_attention=lambda c: tuple(t == "linear_attention" for t in c.layer_types),
    linear_conv_kernel_dim=lambda c: c.linear_conv_kernel_dim,
    linear_key_head_dim=lambda c: c.linear_key_head_dim,
    linear_value_head_dim=lambda c: c.linear_value_head_dim,
    linear_num_key_heads=lambda c: c.linear_num_key_heads,
    linear_num_value_heads=lambda c: c.linear_num_value_heads,
)
SPEC_FIELDS = with_fields(
    DENSE_SPEC_FIELDS,
    **QWEN_MOE_SPEC,
    moe_shared_ffn_hidden_size=lambda c: c.shared_expert_intermediate_size,
    moe_shared_gate=lambda c: True,
)

# Multi-token prediction, as Qwen3-Next's release stores its one MTP layer: apart from the model's
# layers (``Family.mtp_apart``), ``mtp.fc`` taking ``[pre_fc_norm_embedding(embedding);
# pre_fc_norm_hidden(hidden)]`` (megatron-core's ``eh_proj`` of ``[enorm(embedding); hnorm(hidden)]``),
# a decoder layer ``mtp.layers.0`` like the last one, ``mtp.norm``; the model's embedding and output
# head (no copies); its norms zero-centred like the others. The config counts it as
# ``mtp_num_hidden_layers`` (what vLLM reads; transformers keeps the field and ignores ``mtp.*``).
MTP_RULES = (
    Rule(L + "enorm.weight", H + "pre_fc_norm_embedding.weight", ZERO_CENTERED),
    Rule(L + "hnorm.weight", H + "pre_fc_norm_hidden.weight", ZERO_CENTERED),
    Rule(L + "eh_proj.weight", H + "fc.weight"),
    Rule(L + "final_layernorm.weight", H + "norm.weight", ZERO_CENTERED),
)
MTP_APART = ("mtp.", ("pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight", "fc.weight", "norm.weight"))
MTP_REQUIRES: dict[str, Any] = {"mtp_num_layers": lambda n: n in (0, 1), "mtp_conflict": None}
MTP_FIELDS = (("mtp_num_hidden_layers", lambda s: s.mtp_num_layers or None),)
MTP_UNCOUNTED = (("mtp.", "MTP layers the config does not count (mtp_num_hidden_layers)"),)


def _mtp_layers(c: PretrainedConfig) -> int:
    return getattr(c, "mtp_num_hidden_layers", None) or 0



QWEN3_NEXT = Family(
    architecture="Qwen3NextForCausalLM",
    config_class="Qwen3NextConfig",
    rules=MTP_RULES + COMMON_RULES + (
        Rule(_in_proj("query")[0], HL + "in_proj_qkvz.weight", PerKeyHead(_qkvz), joint=_in_proj("key", "value", "z")),
        Rule(_in_proj("beta")[0], HL + "in_proj_ba.weight", PerKeyHead(_ba), joint=_in_proj("alpha")),
    ),
    requires={**REQUIRES, **MTP_REQUIRES},
    config_fields=CONFIG_FIELDS + MTP_FIELDS + (
        ("norm_topk_prob", lambda s: not s.moe_pre_softmax),
        ("decoder_sparse_step", lambda s: 1),
        ("mlp_only_layers", dense_layers),
    ),
    detect=lambda spec: spec.experimental_attention_variant == GDN and bool(spec.num_experts),
    spec_fields=with_fields(SPEC_FIELDS, mtp_num_layers=_mtp_layers),
    spelled_by=QWEN_MOE_SPELLED_BY,
    unconverted=MTP_UNCOUNTED,
    mtp_apart=MTP_APART,
)


def _all_moe(c: PretrainedConfig) -> tuple[bool, ...]:
    return (True,) * c.num_hidden_layers


# Qwen3.5's gated delta net input projection: flat, one HF tensor per Megatron one but q, k, v
FLAT_IN_PROJ = (
    Rule(_in_proj("query")[0], HL + "in_proj_qkv.weight", Concat(_qkv), joint=_in_proj("key", "value")),
    Rule(_in_proj("z")[0], HL + "in_proj_z.weight"),
    Rule(_in_proj("beta")[0], HL + "in_proj_b.weight"),
    Rule(_in_proj("alpha")[0], HL + "in_proj_a.weight"),
)

QWEN3_5_MOE = Family(
    architecture="Qwen3_5MoeForCausalLM",
    config_class="Qwen3_5MoeTextConfig",
    rules=MTP_RULES + COMMON_RULES + FLAT_IN_PROJ,
    requires={**REQUIRES, **MTP_REQUIRES, "moe_layers": all, "moe_pre_softmax": False},  # HF: every layer MoE, renormalised
    config_fields=tuple((n, fn) for n, fn in CONFIG_FIELDS if n != "intermediate_size") + MTP_FIELDS,
    detect=lambda spec: False,  # chosen by --hf-config's architecture: Qwen3-Next expresses every model it does
    spec_fields=with_fields(
        tuple((n, fn) for n, fn in SPEC_FIELDS if n not in ("ffn_hidden_size", "moe_layers", "moe_pre_softmax")),
        ffn_hidden_size=lambda c: c.moe_intermediate_size,  # no dense layer: Megatron-LM's ffn_hidden_size is unused
        moe_layers=_all_moe,
        moe_pre_softmax=lambda c: False,
        mtp_num_layers=_mtp_layers,
    ),
    unconverted=MTP_UNCOUNTED,
    mtp_apart=MTP_APART,
)

QWEN3_5 = Family(
    architecture="Qwen3_5ForCausalLM",
    config_class="Qwen3_5TextConfig",
    rules=MTP_RULES + DENSE_RULES + FLAT_IN_PROJ,
    requires={**DENSE_REQUIRES, **GDN_REQUIRES, **MTP_REQUIRES},  # no experts: every layer a dense gated MLP
    config_fields=GDN_FIELDS + MTP_FIELDS,
    detect=lambda spec: spec.experimental_attention_variant == GDN and not spec.num_experts,
    spec_fields=with_fields(DENSE_SPEC_FIELDS, mtp_num_layers=_mtp_layers),
    unconverted=MTP_UNCOUNTED,
    mtp_apart=MTP_APART,
)
