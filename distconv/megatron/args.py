"""Megatron-LM's training args in one table: read into ``ModelSpec``, written back, given to megatron-core.

A checkpoint's ``args`` (an ``argparse.Namespace`` in its common state) is the only record of
the model it holds. ``FIELDS`` has one row per model-defining field: the ``ModelSpec`` field,
the Megatron-LM arg names (0.12 to 0.19 spellings; the first is written, any is read), the value
Megatron-LM itself uses when the arg is absent (its ``megatron/training/arguments.py`` defaults,
or megatron-core's ``TransformerConfig``/``MLATransformerConfig`` defaults where Megatron-LM has
no flag), and megatron-core's ``TransformerConfig`` field. An absent arg with no such default
(``num_layers``, ``hidden_size``, ...) is an error naming it, never a guess. From the table:

- ``spec_from_args``: the spec of a checkpoint (export, reshard, verify, inspect, MindSpore);
- ``megatron_args``: the args an import writes, which ``spec_from_args`` reads back as the same spec;
- ``config_fields``: the ``TransformerConfig`` fields megatron-core builds the model from
  (``distconv verify``'s model, the tests' fixtures);
- ``layout_args`` and ``parallel_sizes``: the parallel layout, written and read.

Rows are grouped as the writer emits them: the MoE args, the MLA args, the gated delta net's, then
the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

import torch

from distconv.errors import DistconvError
from distconv.megatron.catalogue import Target
from distconv.spec import ModelSpec


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # no default: a checkpoint lacking the arg is an error naming it


def arg(args: argparse.Namespace, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``args`` holds and is not None (args were renamed over time)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            return value
    return default


@dataclasses.dataclass(frozen=True)
class Field:
    """One row: a ``ModelSpec`` field and the Megatron-LM args that carry it.

    A plain row copies one value: read from the first of ``names`` that args hold (else
    ``default``, which may be a function of args), converted by ``kind``; written under
    ``names[0]``; given to ``TransformerConfig`` as ``config``. A derived row (several args make
    one field) has its own ``read``, ``write`` and ``configure``.
    """

    spec: str
    names: tuple[str, ...]
    default: Any = REQUIRED
    kind: Callable[[Any], Any] = lambda value: value
    config: str | None = None
    read: Callable[[argparse.Namespace], Any] | None = None
    write: Callable[[ModelSpec], dict[str, Any]] | None = None
    configure: Callable[[ModelSpec, argparse.Namespace], dict[str, Any]] | None = None

    def value(self, args: argparse.Namespace) -> Any:
        if self.read is not None:
            return self.read(args)
        found = arg(args, *self.names)
        if found is None:
            if self.default is REQUIRED:
                raise DistconvError(f"checkpoint args lack {self.names[0]}: cannot describe the model")
            found = self.default(args) if callable(self.default) else self.default
        return None if found is None else self.kind(found)

    def written(self, spec: ModelSpec) -> dict[str, Any]:
        return self.write(spec) if self.write is not None else {self.names[0]: getattr(spec, self.spec)}

    def configured(self, spec: ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
        if self.configure is not None:
            return self.configure(spec, args)
        return {self.config: getattr(spec, self.spec)} if self.config else {}


# ---- derived rows -----------------------------------------------------------------------------

def _query_groups(args: argparse.Namespace) -> int:
    heads = int(_field("num_attention_heads").value(args))
    return int(args.num_query_groups) if arg(args, "group_query_attention", default=False) else heads


def _activation(args: argparse.Namespace) -> str:
    if arg(args, "swiglu", default=False):
        return "silu"
    if arg(args, "quick_geglu", default=False):  # before bias_gelu_fusion, which it leaves set
        return "quick_gelu"
    if arg(args, "squared_relu", default=False):
        return "relu2"
    if arg(args, "openai_gelu", default=False):
        return "gelu_new"
    if arg(args, "bias_gelu_fusion", default=False):
        return "gelu_fast"
    return "gelu"


def _activation_config(spec: ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
    """The activation as Megatron-LM configures it: SiLU for SwiGLU, else exact GELU, its tanh form
    fused with the bias (``--bias-gelu-fusion``), OpenAI's GELU, squared ReLU, or quick GELU for
    ``--quick-geglu`` (gated). Quick-GEGLU is built unfused: megatron-core's fused kernel clamps
    fc1's output before adding its bias (``fused_bias_geglu.weighted_bias_quick_geglu_impl``), the
    unfused MLP and transformers after."""
    import torch.nn.functional as F

    fn, fusion = {"silu": (F.silu, False), "gelu": (F.gelu, False), "gelu_fast": (F.gelu, True)}.get(spec.activation,
                                                                                                   (None, False))
    if spec.activation == "gelu_new":
        from megatron.core.transformer.utils import openai_gelu as fn
    elif spec.activation == "relu2":
        from megatron.core.activations import squared_relu as fn
    elif spec.activation == "quick_gelu":
        from megatron.core.fusions.fused_bias_geglu import quick_gelu as fn
    return {"activation_func": fn, "bias_activation_fusion": fusion}


def _rope_scaling(args: argparse.Namespace) -> dict[str, Any] | None:
    if arg(args, "multi_latent_attention", default=False) and arg(args, "rope_type", default="yarn") == "yarn":
        # MLA's YaRN; 0.16 has no CLI args for the last three (args of MLATransformerConfig's field names, else its defaults)
        return {
            "rope_type": "yarn",
            "factor": float(arg(args, "rotary_scaling_factor", default=40.0)),
            "original_max_position_embeddings": int(arg(args, "original_max_position_embeddings", default=4096)),
            "beta_fast": float(arg(args, "beta_fast", default=32.0)),
            "beta_slow": float(arg(args, "beta_slow", default=1.0)),
            "mscale": float(arg(args, "mscale", default=1.0)),
            "mscale_all_dim": float(arg(args, "mscale_all_dim", default=0.0)),
        }
    if arg(args, "position_embedding_type") == "yarn" and not arg(args, "multi_latent_attention", default=False):
        return _gpt_yarn(args)
    if arg(args, "use_rope_scaling", default=False):
        # megatron-core hard-codes Llama 3's low/high frequency factors and original length
        return {
            "rope_type": "llama3",
            "factor": float(arg(args, "rope_scaling_factor", default=8.0)),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    factor = arg(args, "rotary_seq_len_interpolation_factor")
    if factor:
        return {"rope_type": "linear", "factor": float(factor)}
    return None


# GPT (not MLA) YaRN: ModelSpec.rope_scaling key -> (Megatron-LM >= 0.19 arg, megatron-core's config
# attribute, the default core_v0.19's ``argument_utils._apply_yarn_config_from_args`` gives it)
GPT_YARN: dict[str, tuple[str, str, Any]] = {
    "factor": ("rotary_scaling_factor", "yarn_rotary_scaling_factor", 1.0),
    "original_max_position_embeddings": ("yarn_original_max_position_embeddings",
                                         "yarn_original_max_position_embeddings", 4096),
    "beta_fast": ("yarn_beta_fast", "yarn_beta_fast", 32.0),
    "beta_slow": ("yarn_beta_slow", "yarn_beta_slow", 1.0),
    "mscale": ("mscale", "yarn_mscale", 1.0),
    "mscale_all_dim": ("mscale_all_dim", "yarn_mscale_all_dim", 0.0),
    "truncate": ("yarn_correction_range_round_to_int", "yarn_correction_range_round_to_int", True),
}


def _gpt_yarn(args: argparse.Namespace) -> dict[str, Any]:
    """``--position-embedding-type yarn`` outside MLA (Megatron-LM core_v0.19's args, with its defaults)."""
    kinds = {"original_max_position_embeddings": int, "truncate": bool}
    return {"rope_type": "yarn", **{key: kinds.get(key, float)(arg(args, name, default=default))
                                    for key, (name, _, default) in GPT_YARN.items()}}


def gpt_yarn_attributes(spec: ModelSpec) -> dict[str, Any]:
    """The ``yarn_*`` attributes megatron-core's ``GPTModel`` reads off its config for
    ``position_embedding_type="yarn"`` (0.16 to 0.19: not ``TransformerConfig`` fields; a missing one
    is an AttributeError there). Empty unless the model is a GPT (not MLA) YaRN model."""
    if spec.position_embedding != "yarn" or spec.multi_latent_attention:
        return {}
    return {attribute: spec.rope_scaling[key] for key, (_, attribute, _) in GPT_YARN.items()}


def _gpt_yarn_written(spec: ModelSpec) -> dict[str, Any]:
    """Megatron-LM core_v0.19's args for GPT YaRN (``--rotary-scaling-factor``, ``--yarn-*``,
    ``--mscale``, ``--mscale-all-dim``); Megatron-LM 0.16 has no flags for them (its model provider
    must set ``gpt_yarn_attributes`` on the config)."""
    if spec.position_embedding != "yarn" or spec.multi_latent_attention:
        return {}
    return {name: spec.rope_scaling[key] for key, (name, _, _) in GPT_YARN.items()}


def _yarn(spec: ModelSpec) -> dict[str, Any] | None:
    return spec.rope_scaling if (spec.rope_scaling or {}).get("rope_type") == "yarn" else None


def rope_args(spec: ModelSpec) -> dict[str, Any]:
    """Megatron-LM's RoPE scaling args (also ``GPTModel``'s): linear interpolation or Llama 3's."""
    rope = spec.rope_scaling or {}
    return dict(rotary_seq_len_interpolation_factor=rope.get("factor") if rope.get("rope_type") == "linear" else None,
                use_rope_scaling=rope.get("rope_type") == "llama3", rope_scaling_factor=rope.get("factor", 8.0))


def _mla_rope_written(spec: ModelSpec) -> dict[str, Any]:
    """``--rope-type``: MLA's own RoPE, YaRN or plain (written with the other MLA args)."""
    if not spec.multi_latent_attention:
        return {}
    yarn = _yarn(spec)
    return dict(rope_type="yarn" if yarn else "rope", **({"rotary_scaling_factor": yarn["factor"], **{k: yarn[k] for k in (
        "mscale", "mscale_all_dim", "original_max_position_embeddings", "beta_fast", "beta_slow")}} if yarn else {}))


def _mla_rope_config(spec: ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
    """MLA's RoPE settings. Its softmax scale depends on ``rotary_scaling_factor`` and
    ``mscale_all_dim`` whatever the RoPE type, so with plain RoPE they are args' (Megatron-LM's
    defaults 1.0, 1.0 and 0.0) as Megatron-LM passes them, not left to MLATransformerConfig's."""
    if not spec.multi_latent_attention:
        return {}
    yarn = _yarn(spec) or {"factor": float(arg(args, "rotary_scaling_factor", default=1.0)),
                           "mscale": float(arg(args, "mscale", default=1.0)),
                           "mscale_all_dim": float(arg(args, "mscale_all_dim", default=0.0))}
    # YaRN's original length and beta_fast/beta_slow: the args' (MLATransformerConfig's field names, which
    # Megatron-LM's ``core_transformer_config_from_args`` copies), else its defaults
    rest = {k: yarn[k] for k in ("original_max_position_embeddings", "beta_fast", "beta_slow")} if _yarn(spec) else {}
    return dict(rope_type="yarn" if _yarn(spec) else "rope", rotary_base=spec.rotary_base, rotary_scaling_factor=yarn["factor"],
                mscale=yarn["mscale"], mscale_all_dim=yarn["mscale_all_dim"], **rest)


def _moe_layers(args: argparse.Namespace) -> tuple[bool, ...]:
    """Which layers are MoE: ``moe_layer_freq`` is an int N (every N-th layer) or a 0/1 list."""
    num_layers = int(_field("num_layers").value(args))
    if is_hybrid(args):  # the pattern's MoE layers
        return tuple(c == "E" for c in _hybrid_pattern(args))
    if not arg(args, "num_experts"):
        return (False,) * num_layers
    freq = arg(args, "moe_layer_freq", default=1)
    if isinstance(freq, str) and freq.strip().isascii() and freq.strip().isdigit():
        freq = int(freq)
    if isinstance(freq, int):
        return tuple(i % freq == 0 for i in range(num_layers))
    if isinstance(freq, (list, tuple)) and len(freq) == num_layers:
        return tuple(bool(x) for x in freq)
    raise DistconvError(f"cannot read moe_layer_freq={freq!r} for {num_layers} layers")


def _window_layers(args: argparse.Namespace) -> tuple[bool, ...] | None:
    """Which layers use the sliding window: ``window_attn_skip_freq`` is None (all), an int N (layer
    number ``i + 1`` not a multiple of N) or a 0/1 list (1: windowed), as megatron-core's
    ``transformer.utils.is_layer_window_attention`` reads it; None when every layer (or none) has a window."""
    freq = arg(args, "window_attn_skip_freq")
    num_layers = int(_field("num_layers").value(args))
    if freq is None or not arg(args, "window_size"):
        return None
    if isinstance(freq, str) and freq.strip().isdigit():
        freq = int(freq)
    if isinstance(freq, int) and freq > 0:
        layers = tuple((i + 1) % freq != 0 for i in range(num_layers))
    elif isinstance(freq, (list, tuple)) and len(freq) == num_layers:
        layers = tuple(bool(x) for x in freq)
    else:
        raise DistconvError(f"cannot read window_attn_skip_freq={freq!r} for {num_layers} layers")
    return None if all(layers) else layers


def window_attn_skip_freq(spec: ModelSpec) -> int | list[int] | None:
    """Megatron-LM's ``window_attn_skip_freq`` for ``spec``: None (every layer windowed), the
    smallest N that gives its layers, else their 0/1 list."""
    layers = spec.window_layers
    if layers is None:
        return None
    for n in range(2, spec.num_layers + 1):
        if layers == tuple((i + 1) % n != 0 for i in range(spec.num_layers)):
            return n
    return [int(w) for w in layers]


def moe_layer_freq(spec: ModelSpec) -> int | list[int]:
    """Megatron-LM's ``moe_layer_freq`` for ``spec``: 1 when every layer is MoE, else its 0/1 list."""
    return 1 if all(spec.moe_layers) else [int(m) for m in spec.moe_layers]


def _linear_attention(args: argparse.Namespace) -> tuple[bool, ...]:
    """Which layers are gated delta nets: ``linear_attention_freq`` is an int N (every N-th layer is
    full attention, the others linear) or a 0/1 list (1: linear), as megatron-core reads it."""
    num_layers = int(_field("num_layers").value(args))
    freq = arg(args, "linear_attention_freq")
    if isinstance(freq, str) and freq.strip().isdigit():
        freq = int(freq)
    if isinstance(freq, int) and not isinstance(freq, bool) and freq >= 1:
        return tuple((i + 1) % freq != 0 for i in range(num_layers))
    if isinstance(freq, (list, tuple)) and len(freq) == num_layers and all(x in (0, 1) for x in freq):
        return tuple(bool(x) for x in freq)
    raise DistconvError(f"cannot read linear_attention_freq={freq!r} for {num_layers} layers of a gated delta net model")


def linear_attention_freq(spec: ModelSpec) -> int | list[int]:
    """Megatron-LM's ``linear_attention_freq`` for ``spec``: the int N > 1 when every N-th layer is full
    attention and the others linear (Megatron-LM's ``--linear-attention-freq N``), else its 0/1 list."""
    n = spec.num_layers
    return next((freq for freq in range(2, n + 1) if tuple((i + 1) % freq != 0 for i in range(n)) == spec.linear_attention),
                [int(x) for x in spec.linear_attention])


def _train_dtype(args: argparse.Namespace) -> torch.dtype:
    if arg(args, "bf16", default=False):
        return torch.bfloat16
    return torch.float16 if arg(args, "fp16", default=False) else torch.float32


def _routing_type(value: Any) -> str:
    return value if isinstance(value, str) else ",".join(value)


def _if_set(**fields: Any) -> dict[str, Any]:
    """``fields`` without those at megatron-core's default (None, 0): ``TransformerConfig`` fields
    older versions lack are passed only when a model uses them."""
    return {k: v for k, v in fields.items() if v}


def _rotary_base(spec: ModelSpec) -> dict[str, Any]:
    base = spec.rotary_base
    return {"rotary_base": int(base) if base == int(base) else base}


# ---- the table --------------------------------------------------------------------------------

MOE_FIELDS: tuple[Field, ...] = (
    Field("num_experts", ("num_experts",), None, int, "num_moe_experts"),
    Field("moe_ffn_hidden_size", ("moe_ffn_hidden_size", "ffn_hidden_size"), None, int, "moe_ffn_hidden_size"),
    Field("moe_topk", ("moe_router_topk",), 2, int, "moe_router_topk"),
    Field("moe_pre_softmax", ("moe_router_pre_softmax",), False, bool, "moe_router_pre_softmax"),
    Field("moe_score_function", ("moe_router_score_function",), "softmax", str, "moe_router_score_function"),
    Field("moe_scaling_factor", ("moe_router_topk_scaling_factor",), None, float, "moe_router_topk_scaling_factor"),
    Field("moe_expert_bias", ("moe_router_enable_expert_bias",), False, bool, "moe_router_enable_expert_bias"),
    Field("moe_num_groups", ("moe_router_num_groups",), None, int, "moe_router_num_groups"),
    Field("moe_group_topk", ("moe_router_group_topk",), None, int, "moe_router_group_topk"),
    Field("moe_routing_type", ("moe_router_load_balancing_type",), "aux_loss", _routing_type,
          configure=lambda s, a: {"moe_router_load_balancing_type": s.moe_routing_type.split(",")
                               if "," in s.moe_routing_type else s.moe_routing_type}),
    # token dropping: no family converts it (HF has none), and verify's model is built without it
    Field("moe_capacity_factor", ("moe_expert_capacity_factor",), None, float),
    Field("moe_shared_ffn_hidden_size", ("moe_shared_expert_intermediate_size",), None, int,
          "moe_shared_expert_intermediate_size"),
    Field("moe_shared_gate", ("moe_shared_expert_gate",), False, bool, "moe_shared_expert_gate"),
    # every layer MoE: 1 (stacked keys); otherwise Megatron-LM's per-layer 0/1 list
    Field("moe_layers", ("moe_layer_freq",), read=_moe_layers, write=lambda s: {"moe_layer_freq": moe_layer_freq(s)},
          configure=lambda s, a: {"moe_layer_freq": moe_layer_freq(s)}),
)

MLA_FIELDS: tuple[Field, ...] = (
    Field("multi_latent_attention", ("multi_latent_attention",), False, bool),
    Field("q_lora_rank", ("q_lora_rank",), None, int, "q_lora_rank"),
    Field("kv_lora_rank", ("kv_lora_rank",), None, int, "kv_lora_rank"),
    Field("qk_head_dim", ("qk_head_dim",), None, int, "qk_head_dim"),
    Field("qk_pos_emb_head_dim", ("qk_pos_emb_head_dim",), None, int, "qk_pos_emb_head_dim"),
    Field("v_head_dim", ("v_head_dim",), None, int, "v_head_dim"),
)

# the gated delta net (``experimental_attention_variant="gated_delta_net"``, megatron-core 0.16):
# megatron-core's TransformerConfig defaults where Megatron-LM 0.16 generates the flags from it
GATED_DELTA_NET = "gated_delta_net"
GDN_FIELDS: tuple[Field, ...] = (
    Field("linear_attention", ("linear_attention_freq",), read=_linear_attention,
          write=lambda s: {"linear_attention_freq": linear_attention_freq(s)},
          configure=lambda s, a: {"linear_attention_freq": linear_attention_freq(s)}),
    Field("linear_conv_kernel_dim", ("linear_conv_kernel_dim",), 4, int, "linear_conv_kernel_dim"),
    Field("linear_key_head_dim", ("linear_key_head_dim",), 128, int, "linear_key_head_dim"),
    Field("linear_value_head_dim", ("linear_value_head_dim",), 128, int, "linear_value_head_dim"),
    Field("linear_num_key_heads", ("linear_num_key_heads",), 16, int, "linear_num_key_heads"),
    Field("linear_num_value_heads", ("linear_num_value_heads",), 32, int, "linear_num_value_heads"),
)

# megatron-core's hybrid model (``MambaModel``, renamed ``HybridModel`` in 0.18): no arg names the
# class (Megatron-LM's ``--spec`` names its layer spec, ``--export-model-type`` is for ModelOpt
# only); a checkpoint is one when its args carry a layer pattern (``hybrid_override_pattern``,
# 0.19's ``hybrid_layer_pattern``), ``is_hybrid_model`` or a Mamba/hybrid ``spec``
HYBRID_SYMBOLS = "M*-E"  # Mamba mixer, attention, MLP, MoE
HYBRID_SPEC = ["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"]


def is_hybrid(args: argparse.Namespace) -> bool:
    """Whether Megatron-LM ``args`` describe a hybrid (Mamba) model."""
    spec = arg(args, "spec")
    named = isinstance(spec, (list, tuple)) and any("mamba" in str(s) or "hybrid" in str(s) for s in spec)
    return bool(arg(args, "hybrid_layer_pattern", "hybrid_override_pattern") or arg(args, "is_hybrid_model") or named)


def _hybrid_pattern(args: argparse.Namespace) -> str:
    """The layer pattern, one symbol per layer (``HYBRID_SYMBOLS``); what distconv cannot lay out
    (a pattern left to ``hybrid_attention_ratio``/``hybrid_mlp_ratio``, 0.19's pipeline ``|`` and MTP
    ``/`` separators, other layer kinds) is an error naming it."""
    pattern = arg(args, "hybrid_layer_pattern", "hybrid_override_pattern")
    if not pattern:
        raise DistconvError("this hybrid (Mamba) checkpoint's args carry no hybrid_override_pattern: a layer "
                            "allocation from hybrid_attention_ratio / hybrid_mlp_ratio is not supported")
    pattern = str(pattern)
    odd = sorted(set(pattern) - set(HYBRID_SYMBOLS))
    if odd:
        raise DistconvError(f"hybrid layer pattern {pattern!r}: distconv converts Mamba (M), attention (*), MLP (-) "
                            f"and MoE (E) layers, not {' '.join(repr(c) for c in odd)}")
    return pattern


HYBRID_FIELDS: tuple[Field, ...] = (
    Field("hybrid_pattern", ("hybrid_override_pattern", "hybrid_layer_pattern"), read=_hybrid_pattern,
          write=lambda s: {"hybrid_override_pattern": s.hybrid_pattern, "is_hybrid_model": True, "spec": HYBRID_SPEC},
          configure=lambda s, a: {"is_hybrid_model": True}),
    Field("mamba_state_dim", ("mamba_state_dim",), 128, int, "mamba_state_dim"),
    Field("mamba_head_dim", ("mamba_head_dim",), 64, int, "mamba_head_dim"),
    Field("mamba_num_groups", ("mamba_num_groups",), 8, int, "mamba_num_groups"),
    # megatron-core's default: twice the hidden size in heads of mamba_head_dim
    Field("mamba_num_heads", ("mamba_num_heads",), lambda a: 2 * int(a.hidden_size) // int(arg(a, "mamba_head_dim", default=64)),
          int, "mamba_num_heads"),
)

# DeepSeek sparse attention (``experimental_attention_variant="dsa"``, megatron-core 0.16 to 0.18):
# the indexer's sizes (megatron-core has no defaults for them). Its loss weight is training's
# (``dsa_indexer_loss_coeff``, ``dsa_indexer_use_sparse_loss``): neither read nor written.
DSA = "dsa"
DSA_FIELDS: tuple[Field, ...] = (
    Field("dsa_indexer_n_heads", ("dsa_indexer_n_heads",), REQUIRED, int, "dsa_indexer_n_heads"),
    Field("dsa_indexer_head_dim", ("dsa_indexer_head_dim",), REQUIRED, int, "dsa_indexer_head_dim"),
    Field("dsa_indexer_topk", ("dsa_indexer_topk",), REQUIRED, int, "dsa_indexer_topk"),
)
# args only megatron-core 0.19's TransformerConfig has, and Megatron-LM 0.19 writes (it generates its
# flags from those fields): 0.19 moved the indexer's RoPE to the front of each head, made its
# interleaving a choice and feeds it the normalised query (commit b0eb914, "Fix several bugs for DSA
# rope and spec"), so the same tensors mean another model there
DSA_019_ARGS = ("dsa_indexer_rope_interleaved", "dsa_indexer_rotate_activation", "dsa_indexer_scoring_relu",
                "dsa_indexer_k_norm_epsilon", "dsa_indexer_topk_freq", "dsa_kernel_backend")


def _dsa_writer(args: argparse.Namespace) -> None:
    """A DSA checkpoint of megatron-core 0.19 or later (``DSA_019_ARGS`` in its args) is refused."""
    found = [name for name in DSA_019_ARGS if hasattr(args, name)]
    if found:
        raise DistconvError(
            f"this DSA checkpoint was written by megatron-core 0.19 or later (its args carry {', '.join(found)}): "
            "0.19 changed the DSA indexer's RoPE layout and query normalisation, and distconv converts the "
            "indexer as megatron-core 0.16 to 0.18 compute it; 0.19 DSA checkpoints are not supported yet")


FIELDS: tuple[Field, ...] = (
    Field("num_layers", ("num_layers",), REQUIRED, int, "num_layers"),
    Field("hidden_size", ("hidden_size",), REQUIRED, int, "hidden_size"),
    Field("ffn_hidden_size", ("ffn_hidden_size",), lambda a: 4 * int(a.hidden_size), int, "ffn_hidden_size"),
    Field("num_attention_heads", ("num_attention_heads",), REQUIRED, int, "num_attention_heads"),
    Field("head_dim", ("kv_channels",), lambda a: int(a.hidden_size) // int(a.num_attention_heads), int, "kv_channels"),
    Field("num_query_groups", ("group_query_attention", "num_query_groups"), kind=int, read=_query_groups,
          write=lambda s: {"group_query_attention": s.num_query_groups != s.num_attention_heads,
                           "num_query_groups": s.num_query_groups},
          configure=lambda s, a: {"num_query_groups": s.num_query_groups
                               if s.num_query_groups != s.num_attention_heads else None}),
    Field("max_position_embeddings", ("max_position_embeddings", "seq_length"), REQUIRED, int,
          write=lambda s: {"max_position_embeddings": s.max_position_embeddings, "seq_length": s.max_position_embeddings}),
    # before position_embedding_type existed (mid-2023), RoPE was --use-rotary-position-embeddings
    Field("position_embedding", ("position_embedding_type", "use_rotary_position_embeddings"), kind=str,
          read=lambda a: arg(a, "position_embedding_type", default="rope" if arg(
              a, "use_rotary_position_embeddings", default=False) else "learned_absolute"),
          write=lambda s: {"position_embedding_type": s.position_embedding}),
    Field("rotary_base", ("rotary_base",), 10000, float, write=_rotary_base),
    Field("rotary_percent", ("rotary_percent",), 1.0, float),
    Field("rotary_interleaved", ("rotary_interleaved",), False, bool, "rotary_interleaved"),
    # linear interpolation, Llama 3's, YaRN (MLA's: 0.16 has no flags for its last three, args named as
    # MLATransformerConfig's fields;
    # GPT's: core_v0.19's --yarn-* flags, ``GPT_YARN``)
    Field("rope_scaling", ("rotary_seq_len_interpolation_factor", "use_rope_scaling", "rope_scaling_factor", "rope_type",
                           "rotary_scaling_factor", "mscale", "mscale_all_dim", "original_max_position_embeddings",
                           "beta_fast", "beta_slow", "yarn_original_max_position_embeddings", "yarn_beta_fast",
                           "yarn_beta_slow", "yarn_correction_range_round_to_int"),
          read=_rope_scaling, write=lambda s: {**rope_args(s), **_gpt_yarn_written(s)}, configure=_mla_rope_config),
    Field("normalization", ("normalization",), "LayerNorm", str, "normalization"),
    Field("norm_epsilon", ("layernorm_epsilon", "norm_epsilon"), 1e-5, float, "layernorm_epsilon"),
    # stored gamma - 1, the norms computing x_hat * (1 + weight): Megatron-LM 0.16 names the flag after
    # TransformerConfig's field, 0.12 to 0.15 ``--apply-layernorm-1p``
    Field("zero_centered_gamma", ("layernorm_zero_centered_gamma", "apply_layernorm_1p"), False, bool,
          "layernorm_zero_centered_gamma"),
    Field("gated_mlp", ("swiglu", "quick_geglu"), kind=bool, config="gated_linear_unit", write=lambda s: {},
          read=lambda a: bool(arg(a, "swiglu", default=False) or arg(a, "quick_geglu", default=False))),
    Field("activation", ("swiglu", "quick_geglu", "squared_relu", "openai_gelu", "bias_gelu_fusion"), read=_activation,
          write=lambda s: {"swiglu": s.gated_mlp and s.activation == "silu", "quick_geglu": s.activation == "quick_gelu",
                           "squared_relu": s.activation == "relu2", "openai_gelu": s.activation == "gelu_new",
                           "bias_gelu_fusion": s.activation == "gelu_fast"},
          configure=_activation_config),
    # gpt-oss's clamped GLU with an offset linear half (--activation-func-clamp-value, --glu-linear-offset)
    # (these rows give megatron-core a field only when set: older versions have none of them)
    Field("activation_clamp", ("activation_func_clamp_value",), None, float,
          configure=lambda s, a: _if_set(activation_func_clamp_value=s.activation_clamp)),
    Field("glu_linear_offset", ("glu_linear_offset",), 0.0, float,
          configure=lambda s, a: _if_set(glu_linear_offset=s.glu_linear_offset)),
    Field("add_bias_linear", ("add_bias_linear",), True, bool, "add_bias_linear"),
    Field("add_qkv_bias", ("add_qkv_bias",), False, bool, "add_qkv_bias"),
    Field("qk_layernorm", ("qk_layernorm",), False, bool, "qk_layernorm"),
    Field("attention_output_gate", ("attention_output_gate",), False, bool, "attention_output_gate"),
    Field("experimental_attention_variant", ("experimental_attention_variant",), None, str,
          "experimental_attention_variant"),
    Field("tie_embeddings", ("untie_embeddings_and_output_weights",), read=lambda a: not arg(
        a, "untie_embeddings_and_output_weights", default=False),
        write=lambda s: {"untie_embeddings_and_output_weights": not s.tie_embeddings}),
    Field("vocab_size", ("vocab_size",), None, int, write=lambda s: {"vocab_size": s.vocab_size},
          read=lambda a: None),  # the true vocab is found elsewhere (``megatron.tokenizer``, the export's options)
    Field("padded_vocab_size", ("padded_vocab_size",), REQUIRED, int),
    Field("mtp_num_layers", ("mtp_num_layers",), 0, lambda n: int(n or 0),
          write=lambda s: {"mtp_num_layers": s.mtp_num_layers or None},
          configure=lambda s, a: {"mtp_num_layers": s.mtp_num_layers} if s.mtp_num_layers else {}),  # only models with MTP
    Field("window_size", ("window_size",), None, lambda w: tuple(w) if w else None,
          configure=lambda s, a: {"window_size": tuple(s.window_size) if s.window_size else None}),
    Field("window_layers", ("window_attn_skip_freq",), read=_window_layers,
          write=lambda s: {"window_attn_skip_freq": window_attn_skip_freq(s)},
          configure=lambda s, a: _if_set(window_attn_skip_freq=window_attn_skip_freq(s))),
    # attention sinks (--softmax-type learnable: megatron-core's softmax_offset)
    Field("softmax_type", ("softmax_type",), "vanilla", str,
          configure=lambda s, a: {} if s.softmax_type == "vanilla" else {"softmax_type": s.softmax_type}),
    Field("train_dtype", ("bf16", "fp16", "params_dtype"), read=_train_dtype,
          write=lambda s: {"bf16": s.train_dtype == torch.bfloat16, "fp16": s.train_dtype == torch.float16,
                           "params_dtype": s.train_dtype}),
    Field("init_std", ("init_method_std",), 0.02, float, "init_method_std"),
)

# every row of the table, the model kinds' own included
ALL_FIELDS = FIELDS + MOE_FIELDS + MLA_FIELDS + GDN_FIELDS + DSA_FIELDS + HYBRID_FIELDS


def _field(spec_name: str) -> Field:
    return next(f for f in ALL_FIELDS if f.spec == spec_name)


def arg_names() -> tuple[str, ...]:
    """Every Megatron-LM arg the table reads or writes."""
    return tuple(dict.fromkeys(n for f in ALL_FIELDS for n in f.names))


def arg_type(name: str) -> Callable[[Any], Any]:
    """The type of Megatron-LM arg ``name``'s value (for flags that take it on a command line)."""
    return next(f.kind for f in ALL_FIELDS if name in f.names)


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """The ``ModelSpec`` of Megatron-LM ``args`` (0.12 to 0.19 spellings); an absent arg without
    Megatron-LM default is an error naming it. A dense model's router args mean nothing and keep
    ``ModelSpec``'s defaults; multi-latent attention's sizes are read for MLA models only."""
    if is_hybrid(args) and arg(args, "num_layers") is None:  # Megatron-LM 0.19 derives it from the pattern
        args = argparse.Namespace(**{**vars(args), "num_layers": len(_hybrid_pattern(args))})
    missing = [f.names[0] for f in FIELDS if f.default is REQUIRED and f.read is None and arg(args, *f.names) is None]
    if missing:
        raise DistconvError(f"checkpoint args lack {', '.join(missing)}: cannot describe the model")
    values = {f.spec: f.value(args) for f in FIELDS}
    if arg(args, "num_experts"):
        values.update({f.spec: f.value(args) for f in MOE_FIELDS})
    mla = _field("multi_latent_attention").value(args)
    values.update({f.spec: f.value(args) if mla or f.spec == "multi_latent_attention" else None for f in MLA_FIELDS})
    if values["experimental_attention_variant"] == GATED_DELTA_NET:
        values.update({f.spec: f.value(args) for f in GDN_FIELDS})
    if values["experimental_attention_variant"] == DSA:
        _dsa_writer(args)
        values.update({f.spec: f.value(args) for f in DSA_FIELDS})
    if is_hybrid(args):
        values.update({f.spec: f.value(args) for f in HYBRID_FIELDS})
        if len(values["hybrid_pattern"]) != values["num_layers"]:
            raise DistconvError(f"hybrid layer pattern {values['hybrid_pattern']!r} has {len(values['hybrid_pattern'])} "
                                f"layers, but num_layers is {values['num_layers']}")
    return ModelSpec(**values)


def megatron_args(spec: ModelSpec, target: Target, *, divisible_by: int, tokenizer: str | None,
                  grouped_gemm: bool = False, transformer_impl: str = "transformer_engine") -> argparse.Namespace:
    """Megatron-LM 0.16 training args for ``spec`` saved at ``target`` (what ``spec_from_args``
    reads back), with an HF tokenizer folder (``tokenizer``), vocab padding unit ``divisible_by``
    and ``--moe-grouped-gemm``."""
    written: dict[str, Any] = {}
    if spec.num_experts:
        for f in MOE_FIELDS:
            written.update(f.written(spec))
        written["moe_grouped_gemm"] = grouped_gemm
    else:
        written["num_experts"] = None
    if spec.multi_latent_attention:
        for f in MLA_FIELDS:
            written.update(f.written(spec))
        written.update(_mla_rope_written(spec))
    else:
        written["multi_latent_attention"] = False
    if spec.experimental_attention_variant == GATED_DELTA_NET:
        for f in GDN_FIELDS:
            written.update(f.written(spec))
    if spec.experimental_attention_variant == DSA:
        for f in DSA_FIELDS:
            written.update(f.written(spec))
    if spec.hybrid_pattern:
        for f in HYBRID_FIELDS:
            written.update(f.written(spec))
        if spec.num_experts:
            written["moe_layer_freq"] = 1  # Megatron-LM's default: the pattern places the MoE layers
    for f in FIELDS:
        written.update(f.written(spec))
        if f.spec == "padded_vocab_size":
            written["make_vocab_size_divisible_by"] = divisible_by
        elif f.spec == "mtp_num_layers":
            # no tokenizer: no type either, or a job resuming with --use-checkpoint-args takes
            # HuggingFaceTokenizer without a path over its own --tokenizer-type and fails to build it
            written.update(tokenizer_type="HuggingFaceTokenizer" if tokenizer else None, tokenizer_model=tokenizer)
    written.update(layout_args(target), ckpt_format="torch_dist")
    written["transformer_impl"] = transformer_impl  # the keys written follow it (``Target.te``)
    return argparse.Namespace(**written)


def layout_args(target: Target) -> dict[str, Any]:
    """The args that say how a checkpoint is laid out: the parallel sizes (expert TP resolved as
    Megatron-LM resolves it) and the smallest world Megatron-LM accepts for them."""
    return dict(tensor_model_parallel_size=target.tp, pipeline_model_parallel_size=target.pp,
                expert_model_parallel_size=target.ep, expert_tensor_parallel_size=target.expert_tp,
                world_size=target.world, data_parallel_size=target.stage_ranks // target.tp)


def parallel_sizes(args: argparse.Namespace) -> tuple[int, int, int, int]:
    """``(TP, PP, EP, expert TP)`` of a checkpoint's args (Megatron-LM's defaults 1, 1, 1 and TP); a
    size that is not a whole number is an error naming it."""
    tp, pp, ep = (_whole(args, name, 1) or 1 for name in
                  ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"))
    return tp, pp, ep, _whole(args, "expert_tensor_parallel_size", None) or tp


def _whole(args: argparse.Namespace, name: str, default: int | None) -> int | None:
    value = arg(args, name, default=default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise DistconvError(f"the checkpoint's args give {name}={value!r}, not a whole number")
    return value


def config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TransformerConfig`` (``MLATransformerConfig`` for MLA) fields that describe the model of
    ``args``; the caller adds how it is built (parallel sizes, initialisation, fusions)."""
    spec = spec_from_args(args)
    rows = (FIELDS + (MOE_FIELDS if spec.num_experts else ()) + (MLA_FIELDS if spec.multi_latent_attention else ())
            + (GDN_FIELDS if spec.experimental_attention_variant == GATED_DELTA_NET else ())
            + (DSA_FIELDS if spec.experimental_attention_variant == DSA else ())
            + (HYBRID_FIELDS if spec.hybrid_pattern else ()))
    out: dict[str, Any] = {}
    for f in rows:
        out.update(f.configured(spec, args))
    if spec.num_experts:  # Megatron-LM's defaults: no auxiliary loss in a forward pass, the allgather dispatcher
        out.update(moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather")
    if spec.experimental_attention_variant == DSA:  # no indexer loss in a forward pass
        out.update(dsa_indexer_loss_coeff=0.0)
    if spec.hybrid_pattern and spec.num_experts:
        out["moe_layer_freq"] = 1  # the pattern places the MoE layers (``MambaStack``)
    return out
