"""DeepSeek-V3.2 (``DeepseekV32ForCausalLM``) and GLM-5 (``GlmMoeDsaForCausalLM``): DeepSeek-V3's
model (MLA, sigmoid routing, shared experts, MTP) plus the DSA indexer in every layer.

megatron-core 0.16 to 0.18 (``experimental_attention_variant="dsa"``, ``DSAIndexer``) and
transformers 5.24 score keys alike, ``sum_h w[h] * relu(q[h] . k)``, but lay the indexer out
otherwise, so a copy of its tensors selects other keys (only a test whose top-k covers the whole
sequence misses it):

- **RoPE.** megatron-core splits each indexer head ``[no-rope (ID - R), rope (R)]`` and rotates
  the last R dims as interleaved pairs (``dsa.DSAIndexer._apply_rope``: ``apply_rotary_pos_emb``
  with the MLA config, which de-interleaves first, ``rope_utils.py``); transformers splits
  ``[rope (R), no-rope]``, rotating half-split pairs ``(i, i + R/2)`` for DeepSeek-V3.2
  (``modeling_deepseek_v32.py`` ``apply_rotary_pos_emb``) and interleaved pairs for GLM-5
  (``modeling_glm_moe_dsa.py`` ``apply_rotary_pos_emb_interleave``). The rows of ``wq_b`` (in
  each head), of ``wk`` and of ``k_norm`` are permuted accordingly (``rope_order``).
- **The query's input.** megatron-core feeds the indexer MLA's q down projection before its
  norm (the DSA spec fuses the norm into ``linear_q_up_proj``, ``q_layernorm`` is an
  ``IdentityOp``); transformers feeds ``q_a_layernorm``'s output, ``gamma * y / rms(y)``. The
  positive per-token ``1 / rms(y)`` scales a query's scores alike and leaves its top-k; the
  per-channel ``gamma`` is folded out of ``wq_b``: HF ``wq_b = megatron wq_b / gamma`` (column-wise),
  and back. The fold is exact from an HF folder of bf16 or fp16 into float32 Megatron weights (the
  product of two such values is exact in float32), and a float32 export returns every value; in
  other precisions it costs one rounding of ``wq_b`` (an export to bf16 is mapped in bf16). A
  ``gamma`` of 0 has no HF form (the export refuses the infinities).
- megatron-core rotates q and k with a Hadamard transform (orthogonal: dot products unchanged),
  transformers does not; the weights do not depend on it.

megatron-core 0.19 changed the indexer (RoPE first, an interleaving option, the normalised
query): its checkpoints are refused (``megatron.args.DSA_019_ARGS``). GLM-5's "shared" indexer
layers (``indexer_types``, from ``index_topk_freq``), which reuse the previous layer's top-k and
hold no indexer tensors, have no megatron-core 0.16 form: refused.

FP8 releases quantize ``wq_b`` (vLLM builds it with the model's quantization) and keep ``wk``,
``weights_proj`` and ``k_norm`` in high precision (vLLM: ``quant_config=None``,
``vllm/models/deepseek_v32/attention.py``); transformers keeps ``weights_proj`` float32.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import torch

from distconv.errors import DistconvError
from distconv.families.base import Family, JointTransform, Rule, Tensors, Transform
from distconv.families.deepseek_v3 import DEEPSEEK_V3, HA, A
from distconv.spec import ModelSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig

IX = A + "core_attention.indexer."
HIX = HA + "indexer."
_Q_NORM = A + "linear_q_up_proj.layer_norm_weight"


def rope_order(spec: ModelSpec, half_split: bool) -> torch.Tensor:
    """For each HF position of an indexer head, the megatron-core position it holds: HF's rope part
    first, then the rest; HF's half-split pair ``(i, i + R/2)`` is megatron-core's interleaved
    ``(2i, 2i + 1)`` (``half_split``, DeepSeek-V3.2), else pairs stay in order (GLM-5)."""
    d, r = spec.dsa_indexer_head_dim, spec.qk_pos_emb_head_dim
    rope = list(range(d - r, d))
    if half_split:
        rope = rope[0::2] + rope[1::2]
    return torch.tensor(rope + list(range(d - r)))


class IndexerRows(Transform):
    """``wk``, ``k_norm``'s weight and bias: one indexer head's positions, permuted (``rope_order``)."""

    def __init__(self, half_split: bool) -> None:
        self.half_split = half_split

    def export(self, t: torch.Tensor, spec: ModelSpec) -> Tensors:
        return (t[rope_order(spec, self.half_split).to(t.device)],)

    def import_(self, ts: Tensors, spec: ModelSpec) -> torch.Tensor:
        return ts[0][torch.argsort(rope_order(spec, self.half_split)).to(ts[0].device)]


class IndexerQuery(JointTransform):
    """Megatron ``(linear_wq_b.weight, linear_q_up_proj.layer_norm_weight)`` <-> HF ``(indexer.wq_b.weight,
    q_a_layernorm.weight)``: each head's rows permuted (``rope_order``) and ``gamma`` folded out of
    the columns, computed in float64 (one rounding to the tensor's dtype); the norm copied."""

    def __init__(self, half_split: bool) -> None:
        self.half_split = half_split

    def _heads(self, w: torch.Tensor, spec: ModelSpec, order: torch.Tensor) -> torch.Tensor:
        heads, dim = spec.dsa_indexer_n_heads, spec.dsa_indexer_head_dim
        return w.reshape(heads, dim, -1)[:, order.to(w.device)].reshape(heads * dim, -1)

    def export(self, ts: Tensors, spec: ModelSpec) -> Tensors:
        wq_b, gamma = ts
        folded = (self._heads(wq_b, spec, rope_order(spec, self.half_split)).double() / gamma.double()).to(wq_b.dtype)
        return folded, gamma

    def import_(self, ts: Tensors, spec: ModelSpec) -> Tensors:
        wq_b, gamma = ts
        rows = self._heads(wq_b, spec, torch.argsort(rope_order(spec, self.half_split)))
        return (rows.double() * gamma.double()).to(torch.promote_types(wq_b.dtype, torch.float32)), gamma


def indexer_rules(half_split: bool) -> tuple[Rule, ...]:
    rows = IndexerRows(half_split)
    return (
        Rule(IX + "linear_wq_b.weight", (HIX + "wq_b.weight", HA + "q_a_layernorm.weight"), IndexerQuery(half_split),
             fp8=True, fp8_keep=(1,), joint=(_Q_NORM,), whole=True),
        Rule(IX + "linear_wk.weight", HIX + "wk.weight", rows),
        Rule(IX + "k_norm.weight", HIX + "k_norm.weight", rows),
        Rule(IX + "k_norm.bias", HIX + "k_norm.bias", rows),
        Rule(IX + "linear_weights_proj.weight", HIX + "weights_proj.weight", hf_float32=True),
    )


def _indexer_types(config: PretrainedConfig) -> str:
    """``"dsa"``, or an error for GLM-5's shared indexer layers (no megatron-core 0.16 form)."""
    shared = [i for i, kind in enumerate(getattr(config, "indexer_types", None) or ()) if kind != "full"]
    if shared:
        raise DistconvError(
            f"indexer_types marks layers {shared} as 'shared' (they reuse the previous layer's top-k and hold no "
            "indexer): megatron-core 0.16 builds an indexer in every layer, so this model has no Megatron form")
    return "dsa"


def _dsa_family(architecture: str, config_class: str, half_split: bool,
                drop: tuple[str, ...], extra: tuple[tuple[str, Callable[[ModelSpec], Any]], ...]) -> Family:
    base = DEEPSEEK_V3
    rules = tuple(r for r in base.rules if r.megatron != _Q_NORM) + indexer_rules(half_split)
    config_fields = tuple((n, fn) for n, fn in base.config_fields if n not in drop + ("num_mtp_layers",)) + (
        ("num_nextn_predict_layers", lambda s: s.mtp_num_layers),
        ("index_n_heads", lambda s: s.dsa_indexer_n_heads),
        ("index_head_dim", lambda s: s.dsa_indexer_head_dim),
        ("index_topk", lambda s: s.dsa_indexer_topk),
    ) + extra
    spec_fields = tuple((n, fn) for n, fn in base.spec_fields if n != "mtp_num_layers") + (
        ("mtp_num_layers", lambda c: int(getattr(c, "num_nextn_predict_layers", 0) or 0)),
        ("experimental_attention_variant", _indexer_types),
        ("dsa_indexer_n_heads", lambda c: c.index_n_heads),
        ("dsa_indexer_head_dim", lambda c: c.index_head_dim),
        ("dsa_indexer_topk", lambda c: c.index_topk),
    )
    return dataclasses.replace(
        base, architecture=architecture, config_class=config_class, rules=rules, model_types=(),
        requires={**base.requires, "experimental_attention_variant": "dsa", "q_lora_rank": lambda r: bool(r),
                  "dsa_indexer_head_dim": lambda d: bool(d)},
        config_fields=config_fields, spec_fields=spec_fields,
        detect=lambda spec: spec.multi_latent_attention and spec.experimental_attention_variant == "dsa",
    )


# DeepSeek-V3.2's configs carry DeepSeek-V3's routing fields (vLLM and SGLang read them), not rope_interleave
DEEPSEEK_V32 = _dsa_family("DeepseekV32ForCausalLM", "DeepseekV32Config", True, drop=("rope_interleave",), extra=())
# GLM-5's configs: no DeepSeek routing fields; every indexer layer "full"
GLM_MOE_DSA = _dsa_family("GlmMoeDsaForCausalLM", "GlmMoeDsaConfig", False,
                          drop=("rope_interleave", "topk_method", "scoring_func", "moe_layer_freq"),
                          extra=(("indexer_types", lambda s: ["full"] * s.num_layers),))
