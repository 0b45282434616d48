"""Where megatron-core's ``GPTModel.sharded_state_dict()`` puts each weight at a given layout.

Import and reshard write checkpoints whose keys, global shapes and chunking are exactly what a
model built at the target layout saves and loads (checked in the tests against a real
``GPTModel``, local layer spec): stacked ``decoder.layers.*`` keys with a leading layer axis,
column-parallel tensors split on dim 0, row-parallel on dim 1, gated ``linear_fc1`` stored
``[gate; up]`` with ``2 x TP`` fragments, replicated norms saved once, and a ``None``
``_extra_state`` object per linear layer. This describes megatron-core's modules, not any model
family.

Mixture of experts (``Target.ep``, ``Target.etp``):

- routed experts are saved under ``mlp.experts.experts.*`` with a global expert axis after the
  layer axis, split over expert TP (ETP, by default TP) like a dense MLP; ``SequentialMLP`` (and
  transformer-engine's ``TEGroupedMLP``) save one chunk per expert and ETP rank, the local
  ``GroupedMLP`` (``--moe-grouped-gemm`` without transformer-engine) one chunk per EP rank
  covering all its experts;
- the router's ``weight`` and ``expert_bias`` and the shared expert's ``gate_weight`` are
  replicated; the shared expert is a dense MLP split over TP;
- models mixing dense and MoE layers (``moe_layer_freq`` a list or > 1) save per-layer keys
  ``decoder.layers.{i}.*`` without the layer axis (megatron-core's "non-homogeneous" layers).

Transformer-engine's spec (``Target.te``; Megatron-LM's default ``--transformer-impl``) differs
from the local one in its norms (``TENorm``: q/k, final, and an MoE layer's pre-MLP norm), which
each save an (empty) ``_extra_state``, as transformer-engine 2's norms do, and in MoE models: an
MoE layer's pre-MLP norm is a module of its own, ``pre_mlp_layernorm.*`` (the local spec saves
it as ``mlp.linear_fc1.layer_norm_*``), and ``--moe-grouped-gemm`` builds ``TEGroupedMLP``,
whose chunks are ``SequentialMLP``'s. Names in the plans stay canonical (``Shard.name``); only the
checkpoint keys (``Shard.key``) follow the spec.

Multi-latent attention (``MLASelfAttention``) is laid out as the transformer-engine spec saves it:
``input_layernorm`` a norm of its own; ``linear_q_proj`` and the up projections
(``linear_q_up_proj``, ``linear_kv_up_proj``: whole heads per TP rank) split on dim 0, with the
latent norms fused into the up projections (``layer_norm_weight``, replicated); the down
projections replicated (``TELinear``, ``parallel_mode="duplicated"``). The local spec splits the
down projections over TP instead; import and reshard refuse it for MLA.

Multi-token prediction layers (``mtp.layers.{m}``, on the last pipeline stage) are named in the
plans as decoder layer ``num_layers + m`` (``plan.mtp_as_layer``; HF's index too) and saved with
per-layer keys: their own ``enorm``, ``hnorm``, ``final_layernorm`` (replicated; TENorms with an
``_extra_state`` in the transformer-engine spec) and ``eh_proj`` (column-parallel), and a decoder
layer under ``transformer_layer.``, built like the last decoder layer.
"""

from __future__ import annotations

import dataclasses
import math
import re

from distconv.errors import DistconvError
from distconv.spec import ModelSpec

_LAYER = re.compile(r"^decoder\.layers\.(?P<layer>\d+)\.(?P<sub>.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(?P<expert>\d+)\.(?P<rest>.+)$")
# per-layer sub-name (or top-level name) -> TP-split axis; anything else is replicated
TP_AXIS = {
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc1.bias": 0,
    "mlp.linear_fc2.weight": 1,
    "mlp.shared_experts.linear_fc1.weight": 0,
    "mlp.shared_experts.linear_fc1.bias": 0,
    "mlp.shared_experts.linear_fc2.weight": 1,
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    # multi-latent attention (transformer-engine's spec): the up projections split by heads
    "self_attention.linear_q_proj.weight": 0,
    "self_attention.linear_q_up_proj.weight": 0,
    "self_attention.linear_kv_up_proj.weight": 0,
    "eh_proj.weight": 0,  # an MTP layer's projection: column-parallel
}
GATED = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.shared_experts.linear_fc1.weight",
         "mlp.shared_experts.linear_fc1.bias")
# one routed expert's tensors (after ``mlp.experts.{e}.``) -> expert-TP split axis
EXPERT_TP_AXIS = {"linear_fc1.weight": 0, "linear_fc1.bias": 0, "linear_fc2.weight": 1}
EXPERT_GATED = ("linear_fc1.weight", "linear_fc1.bias")
# replicated per-layer tensors and top-level tensors megatron-core's GPT saves
REPLICATED = {
    "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.layer_norm_bias",
    "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.layer_norm_bias",
    "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias",  # the transformer-engine spec's MoE layers
    "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight",
    "self_attention.q_layernorm.bias", "self_attention.k_layernorm.bias",
    "self_attention.linear_proj.bias", "mlp.linear_fc2.bias", "mlp.shared_experts.linear_fc2.bias",
    "mlp.router.weight", "mlp.router.expert_bias", "mlp.shared_experts.gate_weight",
    "decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "embedding.position_embeddings.weight",
    # MLA, transformer-engine's spec: the down projections are TELinear(parallel_mode="duplicated"),
    # the latent norms fused into the up projections
    "self_attention.linear_q_down_proj.weight", "self_attention.linear_kv_down_proj.weight",
    "self_attention.linear_q_up_proj.layer_norm_weight", "self_attention.linear_kv_up_proj.layer_norm_weight",
    "enorm.weight", "hnorm.weight", "final_layernorm.weight",  # an MTP layer's own norms
}
# an MTP layer's own modules (the rest of it is its ``transformer_layer``); the norms are TENorms
# in the transformer-engine spec
MTP_EXTRA_STATE = ("eh_proj",)
MTP_TE_NORMS = ("enorm", "hnorm", "final_layernorm")
_MTP_OWN = re.compile(r"^(enorm|hnorm|eh_proj|final_layernorm)\.")
EXPERT_REPLICATED = {"linear_fc2.bias"}
# linear layers whose (empty, for the local and non-fp8 TE specs) extra state megatron-core saves
EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
ATTENTION_EXTRA_STATE = EXTRA_STATE[:2]
SHARED_EXTRA_STATE = ("mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2")
EXPERT_EXTRA_STATE = ("mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2")
QK_NORM_EXTRA_STATE = ("self_attention.q_layernorm", "self_attention.k_layernorm")
MLA_KV_EXTRA_STATE = ("self_attention.linear_kv_down_proj", "self_attention.linear_kv_up_proj", "self_attention.linear_proj")
MLA_Q_EXTRA_STATE = ("self_attention.linear_q_down_proj", "self_attention.linear_q_up_proj")  # with q_lora_rank


@dataclasses.dataclass(frozen=True)
class Target:
    """The parallel layout a checkpoint is written for, as Megatron-LM's flags name it."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallel size; None: TP (Megatron-LM's default)
    grouped_gemm: bool = False  # experts as the local GroupedMLP saves them (--moe-grouped-gemm, local spec)
    per_layer: bool = False  # non-homogeneous layers: ``decoder.layers.{i}.*`` keys, no layer axis
    te: bool = False  # as transformer-engine's spec saves it (--transformer-impl transformer_engine)

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def stage_ranks(self) -> int:
        """Ranks per pipeline stage in the smallest world Megatron-LM accepts: both the dense
        (TP x DP) and the expert (ETP x EP x expert-DP) grids must fill it."""
        return math.lcm(self.tp, self.expert_tp * self.ep)

    @property
    def world(self) -> int:
        return self.pp * self.stage_ranks

    def describe(self, experts: bool) -> str:
        text = f"TP{self.tp} PP{self.pp}"
        if experts:
            text += f" EP{self.ep} ETP{self.expert_tp}" + (" grouped-GEMM" if self.grouped_gemm else "")
        return text


def per_layer_keys(moe_layer_freq: object, experts: bool) -> bool:
    """Whether megatron-core saves per-layer keys: MoE with ``moe_layer_freq`` a list or an int > 1."""
    if not experts:
        return False
    if isinstance(moe_layer_freq, str) and moe_layer_freq.strip().isascii() and moe_layer_freq.strip().isdigit():
        moe_layer_freq = int(moe_layer_freq)
    return not (isinstance(moe_layer_freq, int) and moe_layer_freq == 1)


@dataclasses.dataclass(frozen=True)
class Shard:
    """One chunk of one checkpoint tensor as one target rank saves it."""

    key: str  # checkpoint key (stacked for layers)
    name: str  # per-layer Megatron name, e.g. decoder.layers.3.mlp.linear_fc1.weight
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]  # in the global tensor
    box: tuple[slice, ...]  # inside the per-layer tensor (with ``parts``: the expert axis first)
    fragments: tuple[int, ...]
    target_rank: int  # the rank of the target layout that saves it
    # a grouped-GEMM chunk: the per-expert names (``name`` is the first) stacked along its expert
    # axis; ``box[1:]`` is the box inside each of them
    parts: tuple[str, ...] = ()

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.box)

    def pieces(self) -> list[tuple[str, tuple[slice, ...]]]:
        """The per-layer tensors the chunk is cut from, each with its box (grouped GEMM: one per expert)."""
        if self.parts:
            return [(part, self.box[1:]) for part in self.parts]
        return [(self.name, self.box)]


@dataclasses.dataclass(frozen=True)
class ExtraState:
    """One ``_extra_state`` ShardedObject (saved as ``key/shard_{offsets}_{global_shape}``)."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    target_rank: int


def split_name(name: str) -> tuple[int | None, str]:
    """``decoder.layers.3.mlp.x`` -> (3, ``mlp.x``); top-level names -> (None, name)."""
    m = _LAYER.match(name)
    return (int(m["layer"]), m["sub"]) if m else (None, name)


def split_expert(sub: str) -> tuple[int | None, str]:
    """``mlp.experts.5.linear_fc1.weight`` -> (5, ``linear_fc1.weight``); other names -> (None, sub)."""
    m = _EXPERT.match(sub)
    return (int(m["expert"]), m["rest"]) if m else (None, sub)


def known(name: str) -> bool:
    """Whether this module knows where megatron-core keeps the per-layer (or top-level) tensor."""
    _, sub = split_name(name)
    expert, rest = split_expert(sub)
    if expert is not None:
        return rest in EXPERT_TP_AXIS or rest in EXPERT_REPLICATED
    return sub in TP_AXIS or sub in REPLICATED


def stage_of(name: str, num_layers: int, pp: int) -> int:
    layer, _ = split_name(name)
    if layer is not None:
        return layer_stage(layer, num_layers, pp)
    return 0 if name.startswith("embedding.") else pp - 1


def layer_stage(layer: int, num_layers: int, pp: int) -> int:
    """The pipeline stage of a layer; MTP layers (``num_layers + m``) are on the last one."""
    return min(layer // (num_layers // pp), pp - 1)


def check_layout(spec: ModelSpec, target: Target) -> None:
    """The divisibility megatron-core itself asserts when it builds the model at the target."""
    tp, pp, ep, etp = target.tp, target.pp, target.ep, target.expert_tp
    problems = []
    if min(tp, pp, ep, etp) < 1:
        problems.append("sizes must be >= 1")
    else:
        if spec.num_layers % pp:
            problems.append(f"num_layers {spec.num_layers} is not divisible by PP {pp}")
        for what, n in (("num_attention_heads", spec.num_attention_heads), ("num_query_groups", spec.num_query_groups),
                        ("ffn_hidden_size", spec.ffn_hidden_size), ("padded vocab", spec.padded_vocab_size),
                        ("the shared expert's ffn size", spec.moe_shared_ffn_hidden_size or 0)):
            if n % tp:
                problems.append(f"{what} {n} is not divisible by TP {tp}")
        if spec.num_experts:
            if spec.num_experts % ep:
                problems.append(f"num_experts {spec.num_experts} is not divisible by EP {ep}")
            if (spec.moe_ffn_hidden_size or spec.ffn_hidden_size) % etp:
                problems.append(f"moe_ffn_hidden_size {spec.moe_ffn_hidden_size} is not divisible by expert TP {etp}")
        elif ep != 1 or etp != tp:
            problems.append("EP and expert TP need a model with experts")
    if problems:
        raise DistconvError(f"the model cannot be laid out at {target.describe(bool(spec.num_experts))}: " + "; ".join(problems))


def _tp_boxes(name: str, shape: tuple[int, ...], axis: int | None, n: int,
              gated: bool) -> list[tuple[tuple[slice, ...], tuple[int, ...], int]]:
    """(box, fragments, TP rank) of each chunk of one tensor split ``n`` ways on ``axis``."""
    full = tuple(slice(0, s) for s in shape)
    if axis is None:
        return [(full, (1,) * len(shape), 0)]
    if shape[axis] % n:
        raise DistconvError(f"{name}: dim {axis} of size {shape[axis]} is not divisible by {n}")
    frag = tuple(n if a == axis else 1 for a in range(len(shape)))
    if gated:
        half = shape[0] // 2
        step = half // n
        return [((slice(part * half + r * step, part * half + (r + 1) * step),) + full[1:], (2 * n,) + frag[1:], r)
                for r in range(n) for part in (0, 1)]  # gate rows, then up rows
    step = shape[axis] // n
    return [(tuple(slice(r * step, (r + 1) * step) if a == axis else full[a] for a in range(len(shape))), frag, r)
            for r in range(n)]


def shards_of(name: str, shape: tuple[int, ...], spec: ModelSpec, target: Target) -> list[Shard]:
    """The chunks of one per-layer (or per-expert) tensor at the target, each with the target
    rank that owns it. In the grouped-GEMM form an EP rank's experts make one chunk: it is
    listed under the rank's first expert, and its other experts have none."""
    layer, sub = split_name(name)
    base = stage_of(name, spec.num_layers, target.pp) * target.stage_ranks
    if layer is None or target.per_layer or layer >= spec.num_layers:
        key, lead, lead_shape = _key(name, spec, target), (), ()
    else:
        key, lead, lead_shape = _key(f"decoder.layers.{sub}", spec, target, layer), (layer,), (spec.num_layers,)
    expert, rest = split_expert(sub) if layer is not None else (None, sub)
    if expert is None:
        boxes = _tp_boxes(name, shape, TP_AXIS.get(sub), target.tp, sub in GATED and spec.gated_mlp)
        return [Shard(key, name, lead_shape + shape, lead + _starts(box), box, lead_shape + frag, base + r)
                for box, frag, r in boxes]
    if not spec.num_experts:
        raise DistconvError(f"{name}: an expert tensor in a model without experts")
    experts, etp = spec.num_experts, target.expert_tp
    local = experts // target.ep
    key = key.replace(f"mlp.experts.{expert}.", "mlp.experts.experts.")
    global_shape = lead_shape + (experts,) + shape
    rank = base + etp * (expert // local)  # expert ranks: ETP innermost, then EP (Megatron-LM's order)
    boxes = _tp_boxes(name, shape, EXPERT_TP_AXIS.get(rest), etp, rest in EXPERT_GATED and spec.gated_mlp)
    if not target.grouped_gemm:  # one chunk per expert
        return [Shard(key, name, global_shape, lead + (expert,) + _starts(box), box, lead_shape + (experts,) + frag,
                      rank + r) for box, frag, r in boxes]
    if expert % local:
        return []
    parts = tuple(name.replace(f"mlp.experts.{expert}.", f"mlp.experts.{e}.") for e in range(expert, expert + local))
    return [Shard(key, name, global_shape, lead + (expert,) + _starts(box), (slice(0, local),) + box,
                  lead_shape + (target.ep,) + frag, rank + r, parts) for box, frag, r in boxes]


# an MoE layer's pre-MLP norm: the local spec's spelling (canonical) -> transformer-engine's
TE_MOE_NORM = {"mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
               "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias"}
# MLA layers' input norm is a module of its own in both specs (canonical -> key)
MLA_INPUT_NORM = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight"}
# MLA's latent norms: the local spec's modules -> transformer-engine's (canonical) fused ones
LOCAL_MLA_NORMS = {"self_attention.q_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
                   "self_attention.kv_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight"}


def canonical(name: str, mla: bool = False) -> str:
    """A checkpoint's per-layer name in the canonical spelling: ``pre_mlp_layernorm.*`` (the
    transformer-engine spec's MoE layers) -> ``mlp.linear_fc1.layer_norm_*``; in MLA models
    ``input_layernorm.weight`` -> ``self_attention.linear_qkv.layer_norm_weight`` and the local
    spec's latent norms -> the up projections' ``layer_norm_weight``."""
    layer, sub = split_name(name)
    renames = {te: local for local, te in TE_MOE_NORM.items()}
    if mla:
        renames.update({key: canon for canon, key in MLA_INPUT_NORM.items()})
        renames.update(LOCAL_MLA_NORMS)
    return f"decoder.layers.{layer}.{renames[sub]}" if layer is not None and sub in renames else name


def _key(key: str, spec: ModelSpec, target: Target, layer: int | None = None) -> str:
    """The checkpoint key of a canonical (per-layer or stacked) name at the target's spec."""
    if layer is None:
        layer, sub = split_name(key)
    else:
        sub = key.removeprefix("decoder.layers.")
    if spec.multi_latent_attention and sub in MLA_INPUT_NORM:
        key = key.removesuffix(sub) + MLA_INPUT_NORM[sub]
    elif target.te and layer is not None and spec.is_moe(layer) and sub in TE_MOE_NORM:
        key = key.removesuffix(sub) + TE_MOE_NORM[sub]
    return mtp_key(key, spec.num_layers) if layer is not None and layer >= spec.num_layers else key


def mtp_key(key: str, num_layers: int) -> str:
    """The checkpoint key of an MTP layer's tensor named ``decoder.layers.{num_layers + m}.*``
    (``plan.mtp_as_layer``'s inverse): ``mtp.layers.{m}.`` then its own module or ``transformer_layer.``."""
    layer, sub = split_name(key)
    return f"mtp.layers.{layer - num_layers}." + (sub if _MTP_OWN.match(sub) else f"transformer_layer.{sub}")


def _starts(box: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.start for s in box)


def extra_states(spec: ModelSpec, target: Target) -> list[ExtraState]:
    """One ``_extra_state`` object per linear layer (and routed expert) and transformer-engine norm,
    saved by one rank of its stage."""
    experts = spec.num_experts or 0
    out = []
    for layer in range(spec.num_layers + spec.mtp_num_layers):
        base = layer_stage(layer, spec.num_layers, target.pp) * target.stage_ranks
        moe = spec.is_moe(layer)
        mtp = layer >= spec.num_layers
        if mtp:
            own = f"mtp.layers.{layer - spec.num_layers}."
            out += [ExtraState(f"{own}{sub}._extra_state", (1,), (0,), base)
                    for sub in MTP_EXTRA_STATE + (MTP_TE_NORMS if target.te else ())]
            prefix, shape, offsets = f"{own}transformer_layer.", (1,), (0,)
        elif target.per_layer:
            prefix, shape, offsets = f"decoder.layers.{layer}.", (1,), (0,)
        else:
            prefix, shape, offsets = "decoder.layers.", (spec.num_layers,), (layer,)
        if spec.multi_latent_attention:  # the input norm: a TENorm of its own
            q = MLA_Q_EXTRA_STATE if spec.q_lora_rank else ("self_attention.linear_q_proj",)
            subs = q + MLA_KV_EXTRA_STATE + (("input_layernorm",) if target.te else ())
        else:
            subs = ATTENTION_EXTRA_STATE + (QK_NORM_EXTRA_STATE if target.te and spec.qk_layernorm else ())
        subs += (SHARED_EXTRA_STATE if spec.moe_shared_ffn_hidden_size else ()) if moe else EXTRA_STATE[2:]
        if target.te and moe:  # TENorm
            subs += ("pre_mlp_layernorm",)
        out += [ExtraState(f"{prefix}{sub}._extra_state", shape, offsets, base) for sub in subs]
        if moe:
            lead_shape, lead = ((), ()) if target.per_layer or mtp else (shape, offsets)
            local = experts // target.ep
            out += [ExtraState(f"{prefix}{sub}._extra_state", lead_shape + (experts,), lead + (e,),
                               base + target.expert_tp * (e // local))
                    for e in range(experts) for sub in EXPERT_EXTRA_STATE]
    if target.te:
        out.append(ExtraState("decoder.final_layernorm._extra_state", (1,), (0,), (target.pp - 1) * target.stage_ranks))
    return out


def padded_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's padding: up to a multiple of ``make_vocab_size_divisible_by x TP``."""
    step = divisible_by * tp
    return -(-vocab // step) * step
