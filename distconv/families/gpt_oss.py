"""gpt-oss: attention sinks, alternating sliding windows, biases everywhere, YaRN, and routed
experts with a clamped GLU, fused in HF's layout.

**Experts.** megatron-core keeps each expert's ``linear_fc1`` as ``[gate; up]`` rows ``[2F, H]``
and ``linear_fc2`` as ``[H, F]`` (``nn.Linear``'s ``[out, in]``). transformers holds every expert
of a layer in one tensor, ``[in, out]`` (``x @ W``): ``gate_up_proj [E, H, 2F]`` with gate and up
**interleaved by column** (gate ``j`` in column ``2j``, up ``j`` in ``2j + 1``), ``gate_up_proj_bias
[E, 2F]`` likewise, ``down_proj [E, F, H]`` (fc2 **transposed**) and ``down_proj_bias [E, H]``. Expert
``e``'s tensors are slab ``[e]`` of those (``Rule.stacked``). The hub's MXFP4 release stores the two
weights as ``_blocks``/``_scales`` of their transpose (``hf.mxfp4``).

**The activation** (the same function on both sides; only fc1's output layout differs), with
``c = activation_func_clamp_value`` (HF ``swiglu_limit``) and offset 1:
``g, u = fc1(x) + b1`` split; ``out = min(g, c) * sigmoid(1.702 * min(g, c)) * (clamp(u, -c, c) + 1)``.
megatron-core 0.16.1 (unfused): ``transformer/mlp.py:219-227`` (``torch.chunk``: concatenated halves,
``x_glu.clamp(max=c)``, ``x_linear.clamp(-c, c)``, ``activation_func(x_glu) * (x_linear +
glu_linear_offset)``) with ``fusions/fused_bias_geglu.py:185-187`` (``quick_gelu = y * sigmoid(1.702 *
y)``); transformers 5.24: ``models/gpt_oss/modeling_gpt_oss.py:82-88`` (``GptOssExperts._apply_gate``:
``gate_up[..., ::2]``, ``gate_up[..., 1::2]``: interleaved, the same clamps, ``(up + 1) * glu``,
``alpha = swiglu_alpha``). megatron-core's fused kernel (``bias_activation_fusion``, Megatron-LM's
``--bias-gelu-fusion`` default) clamps fc1's output before adding its bias
(``fusions/fused_bias_geglu.py:424-436``): a model trained with it computed that; the export is the
unfused model, which is also what ``distconv verify`` builds.

**Attention.** Sinks are megatron-core's ``core_attention.softmax_offset`` (``--softmax-type
learnable``), split over TP with the heads; HF's ``layer_types`` is megatron-core's
``window_attn_skip_freq`` (HF's default, sliding on even layers, is megatron-core's 2), its
``sliding_window`` megatron-core's ``window_size[0] + 1``. The router is ``x @ W.T + b``, top-k of
the logits, softmax over the k (megatron-core's softmax router without pre-softmax).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from distconv.errors import DistconvError
from distconv.families.base import QKV, Family, Rule, Transform
from distconv.families.llama import RULES, H, L, spec_fields
from distconv.families.moe import MOE_REQUIRES, fields, with_fields
from distconv.spec import ModelSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig

A, HA = L + "self_attention.", H + "self_attn."
E, HE = L + "mlp.experts.{expert}.", H + "mlp.experts."
QUICK_GELU_ALPHA = 1.702  # megatron-core's quick_gelu (fused_bias_geglu.py:187), HF's swiglu_alpha


class InterleavedGateUp(Transform):
    """An expert's fc1 ``[gate; up]`` (weight ``[2F, H]`` or bias ``[2F]``) <-> HF's slab, gate and up
    interleaved (and a weight transposed to ``[H, 2F]``)."""

    def export(self, t: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        gate, up = t.chunk(2, dim=0)
        mixed = torch.stack((gate, up), dim=1).reshape(t.shape)
        return (mixed.transpose(0, 1) if t.dim() == 2 else mixed,)

    def import_(self, ts: tuple[torch.Tensor, ...], spec: ModelSpec) -> torch.Tensor:
        (t,) = ts
        rows = t.transpose(0, 1) if t.dim() == 2 else t
        return torch.cat((rows[0::2], rows[1::2]))


class Transposed(Transform):
    """An expert's fc2 weight ``[H, F]`` <-> HF's slab ``[F, H]``."""

    def export(self, t: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        return (t.transpose(0, 1),)

    def import_(self, ts: tuple[torch.Tensor, ...], spec: ModelSpec) -> torch.Tensor:
        return ts[0].transpose(0, 1)


GATE_UP = InterleavedGateUp()
DOWN = Transposed()

# transformers keeps the norms float32 in a model of any dtype (``_keep_in_fp32_modules``): a folder it
# saved may hold them so beside bf16 weights (the hub's are bf16)
_NORMS = (L + "self_attention.linear_qkv.layer_norm_weight", L + "mlp.linear_fc1.layer_norm_weight",
          "decoder.final_layernorm.weight")
RULES = tuple(dataclasses.replace(r, hf_float32=r.megatron in _NORMS) for r in RULES
              if r.megatron not in (L + "mlp.linear_fc1.weight", L + "mlp.linear_fc2.weight")) + (
    Rule(A + "linear_qkv.bias", (HA + "q_proj.bias", HA + "k_proj.bias", HA + "v_proj.bias"), QKV),
    Rule(A + "linear_proj.bias", HA + "o_proj.bias"),
    Rule(A + "core_attention.softmax_offset", HA + "sinks"),
    Rule(L + "mlp.router.weight", H + "mlp.router.weight"),
    Rule(L + "mlp.router.bias", H + "mlp.router.bias"),
    Rule(E + "linear_fc1.weight", HE + "gate_up_proj", GATE_UP, stacked=True, mxfp4=True),
    Rule(E + "linear_fc1.bias", HE + "gate_up_proj_bias", GATE_UP, stacked=True),
    Rule(E + "linear_fc2.weight", HE + "down_proj", DOWN, stacked=True, mxfp4=True),
    Rule(E + "linear_fc2.bias", HE + "down_proj_bias", stacked=True),
)


def _rope_parameters(spec: ModelSpec) -> dict[str, Any]:
    """HF's ``rope_parameters``: YaRN (with megatron-core's attention factor ``mscale / mscale_all_dim``
    spelled out only where it is not HF's default) or plain RoPE."""
    if spec.position_embedding != "yarn":
        return {"rope_type": "default", "rope_theta": float(spec.rotary_base)}
    y = spec.rope_scaling
    out = {"rope_type": "yarn", "factor": y["factor"], "original_max_position_embeddings": y["original_max_position_embeddings"],
           "beta_fast": y["beta_fast"], "beta_slow": y["beta_slow"], "truncate": y["truncate"],
           "rope_theta": float(spec.rotary_base)}
    if (y["mscale"], y["mscale_all_dim"]) != (1.0, 0.0):
        out.update(mscale=y["mscale"], mscale_all_dim=y["mscale_all_dim"])
    return out


def _rope_expressible(rope: dict[str, Any] | None) -> bool:
    """No scaling (plain RoPE), or GPT YaRN whose attention factor HF computes alike: megatron-core's
    default (``mscale`` 1, ``mscale_all_dim`` 0: HF's ``0.1 ln(factor) + 1``) or both set (HF uses them
    only when neither is 0), and ``beta_fast``/``beta_slow`` not 0 (HF reads 0 as its default)."""
    if rope is None:
        return True
    return (rope.get("rope_type") == "yarn" and "truncate" in rope and bool(rope["beta_fast"]) and bool(rope["beta_slow"])
            and ((rope["mscale"], rope["mscale_all_dim"]) == (1.0, 0.0) or (bool(rope["mscale"]) and bool(rope["mscale_all_dim"]))))


def _rope_from_hf(config: PretrainedConfig) -> tuple[str, dict[str, Any] | None]:
    """(position_embedding, rope_scaling) of an HF gpt-oss config: plain RoPE or YaRN; anything else,
    or an explicit ``attention_factor``, is an error."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return "rope", None
    known = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
             "truncate", "mscale", "mscale_all_dim"}
    extra = sorted(set(rope) - known)
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if kind != "yarn" or extra or not rope.get("factor") or not rope.get("original_max_position_embeddings"):
        raise DistconvError(f"RoPE {rope!r}: gpt-oss converts plain RoPE or YaRN with a factor and "
                            "original_max_position_embeddings (no attention_factor)")
    both = bool(mscale) and bool(mscale_all_dim)  # HF: else the default 0.1 ln(factor) + 1
    return "yarn", {"rope_type": "yarn", "factor": float(rope["factor"]),
                    "original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
                    "beta_fast": float(rope.get("beta_fast") or 32.0), "beta_slow": float(rope.get("beta_slow") or 1.0),
                    "mscale": float(mscale) if both else 1.0, "mscale_all_dim": float(mscale_all_dim) if both else 0.0,
                    "truncate": bool(rope.get("truncate", True))}


def _layer_types(spec: ModelSpec) -> list[str]:
    return ["sliding_attention" if spec.windowed(i) else "full_attention" for i in range(spec.num_layers)]


def _window_layers(config: PretrainedConfig) -> tuple[bool, ...] | None:
    """megatron-core's ``window_attn_skip_freq`` as ``ModelSpec.window_layers`` from HF's ``layer_types``."""
    types = list(config.layer_types)
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != config.num_hidden_layers:
        raise DistconvError(f"layer_types {types!r}: gpt-oss converts one of sliding_attention/full_attention per layer")
    layers = tuple(t == "sliding_attention" for t in types)
    return None if all(layers) or not config.sliding_window else layers


def _biases(config: PretrainedConfig) -> bool:
    if not config.attention_bias:
        raise DistconvError("attention_bias false: megatron-core's add_bias_linear gives attention, router and experts "
                            "biases together (gpt-oss's router and experts always have them)")
    return True


def _alpha(config: PretrainedConfig) -> str:
    if float(config.swiglu_alpha) != QUICK_GELU_ALPHA:
        raise DistconvError(f"swiglu_alpha {config.swiglu_alpha}: megatron-core's quick GELU has alpha {QUICK_GELU_ALPHA}")
    return "quick_gelu"


def _vllm_notes(spec: ModelSpec) -> list[str]:
    """What vLLM 0.32 serves otherwise: it clamps at 7.0 (``SwigluOAIAndMul``) and windows the even
    layers (``models/gpt_oss.py``), whatever ``swiglu_limit`` and ``layer_types`` say."""
    notes = []
    if spec.activation_clamp != 7.0:
        notes.append(f"swiglu_limit {spec.activation_clamp}: vLLM 0.32 clamps gpt-oss's experts at 7.0 whatever the "
                     "config says (transformers reads it)")
    if spec.window_size is not None and [spec.windowed(i) for i in range(spec.num_layers)] != [
            i % 2 == 0 for i in range(spec.num_layers)]:
        notes.append("layer_types: vLLM 0.32 gives gpt-oss's sliding window to layers 0, 2, 4, ... whatever the "
                     "config says (transformers reads it)")
    return notes


GPT_OSS = Family(
    architecture="GptOssForCausalLM",
    config_class="GptOssConfig",
    rules=RULES,
    requires={
        **MOE_REQUIRES,
        "moe_layers": all,
        "moe_score_function": "softmax",
        "moe_pre_softmax": False,  # HF: top-k of the logits, softmax over the k
        "moe_expert_bias": False,
        "moe_group_topk": None,
        "moe_scaling_factor": lambda f: f in (None, 1.0),
        "moe_shared_ffn_hidden_size": None,
        "activation": "quick_gelu",
        "activation_clamp": lambda c: c is not None and c > 0,
        "glu_linear_offset": 1.0,  # HF adds 1 to the linear half
        "add_bias_linear": True,  # HF: q/k/v/o, router and expert biases
        "add_qkv_bias": lambda b: True,  # implied by add_bias_linear
        "softmax_type": "learnable",
        "window_size": lambda w: w is None or w[1] == 0,
        "window_layers": lambda w: True,
        "position_embedding": lambda p: p in ("rope", "yarn"),
        "rope_scaling": _rope_expressible,
    },
    config_fields=fields(drop=("intermediate_size", "hidden_act", "rope_theta", "rope_scaling")) + (
        ("intermediate_size", lambda s: s.moe_ffn_hidden_size),
        ("num_local_experts", lambda s: s.num_experts),
        ("num_experts_per_tok", lambda s: s.moe_topk),
        ("attention_bias", lambda s: True),
        ("sliding_window", lambda s: s.window_size[0] + 1 if s.window_size else None),
        ("layer_types", _layer_types),
        ("rope_parameters", _rope_parameters),
        ("swiglu_limit", lambda s: s.activation_clamp),
        ("swiglu_alpha", lambda s: QUICK_GELU_ALPHA),
    ),
    detect=lambda spec: spec.softmax_type == "learnable" and bool(spec.num_experts),
    nullable=("sliding_window",),
    serving_notes=_vllm_notes,
    spec_fields=with_fields(
        spec_fields(
            ffn_hidden_size=lambda c: c.intermediate_size,
            activation=_alpha,
            add_bias_linear=_biases,
            add_qkv_bias=lambda c: True,
            position_embedding=lambda c: _rope_from_hf(c)[0],
            rope_scaling=lambda c: _rope_from_hf(c)[1],
            window_size=lambda c: (c.sliding_window - 1, 0) if c.sliding_window else None,
        ),
        num_experts=lambda c: c.num_local_experts,
        moe_layers=lambda c: (True,) * c.num_hidden_layers,
        moe_ffn_hidden_size=lambda c: c.intermediate_size,
        moe_topk=lambda c: c.num_experts_per_tok,
        softmax_type=lambda c: "learnable",
        window_layers=_window_layers,
        activation_clamp=lambda c: float(c.swiglu_limit),
        glu_linear_offset=lambda c: 1.0,
    ),
)
