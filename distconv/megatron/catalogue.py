"""The catalogue of megatron-core's checkpoint layout: what ``GPTModel.sharded_state_dict()`` saves.

One entry (``ModuleKind``) per kind of module megatron-core's GPT model is built of: its tensors
(``Param``), how each is split over tensor parallelism, how each transformer spec spells its key,
which modules save an (empty) ``_extra_state``, and in which layers the module exists. Everything
else about the layout is derived from ``CATALOGUE`` here: the chunks import and reshard write
(``shards_of``, ``extra_states``), the canonical names export, reshard and verify read stored keys
back to (``canonical``, ``spellings``), the legacy reader's split axes (``param_of``), the
names of an MTP layer's own tensors, and the layer and expert counts stored keys hold
(``stored_counts``, which ``verify`` checks args against). This describes megatron-core's modules, not any model family:
a family's rules map the canonical names to HF names.

**Names.** A per-layer tensor is named ``decoder.layers.{i}.<name>``, a routed expert's
``decoder.layers.{i}.mlp.experts.{e}.<name>``, a model tensor by its key. Canonical names are the
transformer-engine spec's fused ones (``self_attention.linear_qkv.layer_norm_weight``); a
``Spelling`` says when a checkpoint keys a tensor otherwise. Import and reshard write checkpoints
whose keys, global shapes and chunking are exactly what a model built at the target layout saves
and loads (checked in the tests against a real ``GPTModel``, local and transformer-engine specs).

**Layers.** Decoder layers are stacked: one ``decoder.layers.<name>`` key with a leading layer
axis. Models mixing dense and MoE layers (``moe_layer_freq`` a list or > 1) save per-layer keys
``decoder.layers.{i}.<name>`` without the layer axis (megatron-core's "non-homogeneous" layers).

**Splits.** Column-parallel tensors are split over TP on dim 0, row-parallel ones on dim 1, the
vocab tensors on dim 0 (padded to ``make_vocab_size_divisible_by x TP`` rows); the rest is
replicated and saved once. Gated ``linear_fc1`` is stored ``[gate; up]`` and split as ``2 x TP``
fragments (each TP rank holds its slice of both halves). Each linear layer saves a ``None``
``_extra_state`` object, as the local and non-fp8 transformer-engine specs do.

**Transformer-engine's spec** (``Target.te``; Megatron-LM's default ``--transformer-impl``)
differs from the local one in its norms (``TENorm``: q/k, final, an MoE layer's pre-MLP norm,
MLA's input norm), which each save an (empty) ``_extra_state`` as transformer-engine 2's norms
do; an MoE layer's pre-MLP norm is a module of its own (``pre_mlp_layernorm.*``, where the local
spec keys it ``mlp.linear_fc1.layer_norm_*``); ``--moe-grouped-gemm`` builds ``TEGroupedMLP``,
whose chunks are ``SequentialMLP``'s. Names in the plans stay canonical (``Shard.name``); only
the checkpoint keys (``Shard.key``) follow the spec.

**Mixture of experts** (``Target.ep``, ``Target.etp``): routed experts are saved under
``mlp.experts.experts.<name>`` with a global expert axis after the layer axis, split over expert
TP (ETP, by default TP) like a dense MLP; ``SequentialMLP`` (and ``TEGroupedMLP``) save one chunk
per expert and ETP rank, the local ``GroupedMLP`` (``--moe-grouped-gemm`` without
transformer-engine) one chunk per EP rank covering all its experts. Other versions and formats
key one expert per key (``EXPERT_SPELLINGS``).

**Multi-latent attention** (``MLASelfAttention``) is laid out as the transformer-engine spec
saves it; the local spec splits the down projections over TP instead, and import and reshard
refuse it for MLA.

**Multi-token prediction** layers (``mtp.layers.{m}``, on the last pipeline stage) are named as
decoder layer ``num_layers + m`` (``mtp_as_layer``; HF's index too) and saved with per-layer keys:
their own modules (``MTP``), and a decoder layer under ``transformer_layer.``, built like the
last decoder layer.

**Gated delta net** layers (Qwen3-Next's linear attention, ``experimental_attention_variant=
"gated_delta_net"``) replace attention in the layers ``linear_attention_freq`` marks; such models
save per-layer keys. Each of the packed ``in_proj``'s components is saved as a tensor of its own.

**Hybrid models** (megatron-core's ``MambaModel``, Nemotron-H) build one module per symbol of
``hybrid_override_pattern``: a Mamba-2 mixer ("M", ``mixer.*`` with its input norm fused into
``in_proj``), attention ("*", no MLP), an MLP ("-", no attention, its norm fused into
``linear_fc1``) or MoE ("E", ``pre_mlp_layernorm`` and the experts). Keys are per layer with global
layer numbers; the final norm is ``decoder.final_norm``. A pipeline stage holds ``num_layers // PP``
layers: megatron-core drops the rest without a word, so ``check_layout`` refuses such a PP.

Adding a module kind (an indexer) is one ``ModuleKind`` here, plus the family's rules (and the
model builder, for ``verify``).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from typing import Callable, Iterable

from distconv.engine.plan import Part
from distconv.errors import DistconvError
from distconv.megatron.checkpoint import TensorInfo
from distconv.spec import ModelSpec


class Split(enum.Enum):
    """How a tensor is divided over tensor parallelism (expert TP for a routed expert's)."""

    COLUMN = 0  # dim 0
    ROW = 1  # dim 1
    VOCAB = 2  # dim 0, padded rows
    REPLICATED = 3  # whole on every rank, saved once

    @property
    def axis(self) -> int | None:
        return {Split.COLUMN: 0, Split.ROW: 1, Split.VOCAB: 0}.get(self)


class Scope(enum.Enum):
    """What a name is relative to."""

    MODEL = "model"  # a top-level key
    LAYER = "layer"  # a decoder layer (or an MTP layer's transformer layer)
    EXPERT = "expert"  # one routed expert of an MoE layer (after ``mlp.experts.{e}.``)
    MTP = "mtp"  # an MTP layer's own modules (beside its transformer layer)


@dataclasses.dataclass(frozen=True)
class Spelling:
    """A key (or module path) other than the canonical one, and where it is used: in
    multi-latent attention models or not (``mla``), in the transformer-engine spec or the local one
    (``te``), in MoE layers or dense ones (``moe``), in gated delta net layers or attention ones
    (``linear``); None: either. Reading, a spelling is taken back to the canonical name whatever the
    spec and layer (a checkpoint of any spec is read), but one used in MLA models only is read so in
    MLA models only (``canonical``). ``mamba``: in a hybrid model's Mamba layers or not."""

    key: str
    mla: bool | None = None
    te: bool | None = None
    moe: bool | None = None
    linear: bool | None = None
    mamba: bool | None = None

    def applies(self, mla: bool, te: bool, moe: bool, linear: bool = False, mamba: bool = False) -> bool:
        return all(want is None or want == have for want, have in
                   ((self.mla, mla), (self.te, te), (self.moe, moe), (self.linear, linear), (self.mamba, mamba)))


@dataclasses.dataclass(frozen=True)
class Param:
    """One tensor of a module."""

    name: str  # canonical, relative to the entry's scope
    split: Split = Split.REPLICATED
    gated: bool = False  # ``[gate; up]`` halves, split separately when the MLP is gated (swiglu)
    spellings: tuple[Spelling, ...] = ()  # keys of some specs or layers
    aliases: tuple[str, ...] = ()  # names other versions saved it under (legacy GPT, unmapped local modules)
    shape: Callable[[ModelSpec], tuple[int, ...]] | None = None  # where nothing else tells it (MTP's own)


def _always(spec: ModelSpec, layer: int | None) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class ModuleKind:
    """One kind of module: its tensors and ``_extra_state`` objects, and where it exists."""

    kind: str
    scope: Scope
    params: tuple[Param, ...]
    extra_state: tuple[Spelling, ...] = ()  # module paths saving an (empty) ``_extra_state``, and where
    present: Callable[[ModelSpec, int | None], bool] = _always  # whether the model (layer ``i``) has it


def _mla(spec: ModelSpec, layer: int | None) -> bool:
    return spec.multi_latent_attention


def _moe(spec: ModelSpec, layer: int | None) -> bool:
    return spec.is_moe(layer)


def _attention(spec: ModelSpec, layer: int | None) -> bool:
    """Softmax attention with fused QKV (not MLA; not a gated delta net layer; a hybrid model's "*" layers)."""
    return not spec.multi_latent_attention and not _gdn(spec, layer) and _kind(spec, layer, "*")


def _kind(spec: ModelSpec, layer: int | None, symbols: str) -> bool:
    """Outside hybrid models: True; in one, whether layer ``layer``'s pattern symbol is one of ``symbols``."""
    kind = spec.layer_kind(layer)
    return kind is None or kind in symbols


def _mamba(spec: ModelSpec, layer: int | None) -> bool:
    """A hybrid model's Mamba layer."""
    return spec.layer_kind(layer) == "M"


def _gdn(spec: ModelSpec, layer: int | None) -> bool:
    """A gated delta net layer (linear attention)."""
    return layer is not None and spec.is_linear_attention(layer)


_W, _B = "weight", "bias"
GDN_IN_PROJ = ("query", "key", "value", "z", "beta", "alpha")  # the gated delta net's in_proj components
GDN_CONV = ("query", "key", "value")  # ... and its conv1d's
MAMBA_IN_PROJ = ("z", "x", "B", "C", "dt")  # the Mamba mixer's in_proj components, in its rows' order
MAMBA_CONV = ("x", "B", "C")  # ... and its conv1d's
_MX = "mixer."
_SA, _MLP = "self_attention.", "mlp."
_IX = _SA + "core_attention.indexer."
PROJ = (Param(_SA + "linear_proj.weight", Split.ROW, aliases=("self_attention.dense.weight", "attention.dense.weight")),
        Param(_SA + "linear_proj.bias", aliases=("self_attention.dense.bias", "attention.dense.bias")))


def _norm(name: str, *spellings: Spelling, aliases: tuple[str, ...] = ()) -> tuple[Param, ...]:
    """A norm's weight and bias (LayerNorm; RMSNorm has the weight only), replicated."""
    return tuple(Param(f"{name}{p}", spellings=tuple(dataclasses.replace(s, key=s.key + p) for s in spellings),
                       aliases=tuple(f"{old}{p}" for old in aliases)) for p in (_W, _B))


def _linear(name: str, split: Split, gated: bool = False, aliases: tuple[str, ...] = ()) -> tuple[Param, ...]:
    """A linear layer's weight and bias (split like the weight's rows; a row-parallel bias is replicated)."""
    return (Param(f"{name}.weight", split, gated, aliases=tuple(f"{old}.weight" for old in aliases)),
            Param(f"{name}.bias", Split.REPLICATED if split is Split.ROW else split, gated,
                  aliases=tuple(f"{old}.bias" for old in aliases)))


# in the order megatron-core's save lists a layer's extra state: attention (MLA's q and kv, the input
# norm, or fused QKV and its q/k norms), then the MLP (shared expert or dense MLP, the pre-MLP norm,
# router, experts)
CATALOGUE: tuple[ModuleKind, ...] = (
    ModuleKind("embedding", Scope.MODEL, (Param("embedding.word_embeddings.weight", Split.VOCAB),
                                          Param("embedding.position_embeddings.weight"))),
    # multi-latent attention (its query, with or without LoRA, then its kv and output): the up
    # projections (whole heads per TP rank) split on dim 0, the down projections replicated
    # (TELinear, parallel_mode="duplicated"), the latent norms fused into the up projections (the
    # local spec keeps them as q_layernorm / kv_layernorm)
    ModuleKind("mla_q_lora", Scope.LAYER, (
        Param(_SA + "linear_q_down_proj.weight"),
        Param(_SA + "linear_q_up_proj.weight", Split.COLUMN),
        Param(_SA + "linear_q_up_proj.layer_norm_weight", spellings=(Spelling(_SA + "q_layernorm.weight", mla=True, te=False),)),
    ), (Spelling(_SA + "linear_q_down_proj"), Spelling(_SA + "linear_q_up_proj")),
        present=lambda spec, layer: spec.multi_latent_attention and bool(spec.q_lora_rank)),
    ModuleKind("mla_q_proj", Scope.LAYER, (Param(_SA + "linear_q_proj.weight", Split.COLUMN),),
               (Spelling(_SA + "linear_q_proj"),),
               present=lambda spec, layer: spec.multi_latent_attention and not spec.q_lora_rank),
    ModuleKind("mla", Scope.LAYER, (
        Param(_SA + "linear_kv_down_proj.weight"),
        Param(_SA + "linear_kv_up_proj.weight", Split.COLUMN),
        Param(_SA + "linear_kv_up_proj.layer_norm_weight", spellings=(Spelling(_SA + "kv_layernorm.weight", mla=True, te=False),)),
    ) + PROJ, (Spelling(_SA + "linear_kv_down_proj"), Spelling(_SA + "linear_kv_up_proj"), Spelling(_SA + "linear_proj")),
        present=_mla),
    # DeepSeek sparse attention's indexer (``DSAIndexer``, experimental_attention_variant "dsa": every
    # MLA layer, built from the transformer-engine spec only): its linears are TELinears of
    # parallel_mode "duplicated" and its k_norm a LayerNorm, all replicated across TP, each saving
    # an ``_extra_state``; the core attention around it (``DSAttention``) saves nothing of its own
    ModuleKind("dsa_indexer", Scope.LAYER, (
        Param(_IX + "linear_wq_b.weight"),
        Param(_IX + "linear_wk.weight"),
        *_norm(_IX + "k_norm."),
        Param(_IX + "linear_weights_proj.weight"),
    ), tuple(Spelling(_IX + m) for m in ("linear_wq_b", "linear_wk", "k_norm", "linear_weights_proj")),
        present=lambda spec, layer: spec.multi_latent_attention and spec.experimental_attention_variant == "dsa"),
    # the norm before attention: fused into linear_qkv (TELayerNormColumnParallelLinear; the local
    # spec's module maps its keys there), a module of its own in MLA layers (both specs; a TENorm),
    # fused into the gated delta net's in_proj in its layers and the Mamba mixer's in Mamba layers
    # (a hybrid model's MLP and MoE layers have none)
    ModuleKind("input_norm", Scope.LAYER,
               _norm(_SA + "linear_qkv.layer_norm_", Spelling("input_layernorm.", mla=True),
                     Spelling(_SA + "in_proj.layer_norm_", linear=True), Spelling(_MX + "in_proj.layer_norm_", mamba=True),
                     aliases=("input_layernorm.", "input_norm.")),
               (Spelling("input_layernorm", mla=True, te=True),),
               present=lambda spec, layer: _kind(spec, layer, "M*")),
    # attention sinks (--softmax-type learnable, gpt-oss): a logit per head, split over TP with its heads;
    # transformer-engine's attention then saves an (empty) ``_extra_state`` beside it
    ModuleKind("attention_sinks", Scope.LAYER, (Param(_SA + "core_attention.softmax_offset", Split.COLUMN),),
               (Spelling(_SA + "core_attention", te=True),),
               present=lambda spec, layer: spec.softmax_type == "learnable" and _attention(spec, layer)),
    # fused QKV, per query group ``[q (heads/groups heads), k, v]``; with ``attention_output_gate``
    # (Qwen3-Next) ``[q, gate, k, v]``, the gate as many rows as the group's queries
    ModuleKind("qkv_attention", Scope.LAYER,
               _linear(_SA + "linear_qkv", Split.COLUMN,
                       aliases=("self_attention.query_key_value", "attention.query_key_value")) + PROJ,
               (Spelling(_SA + "linear_qkv"), Spelling(_SA + "linear_proj")),
               present=_attention),
    # per-head q/k norms (Qwen3, GLM-4.5): TENorms in the transformer-engine spec
    ModuleKind("qk_norms", Scope.LAYER, _norm(_SA + "q_layernorm.") + _norm(_SA + "k_layernorm."),
               (Spelling(_SA + "q_layernorm", te=True), Spelling(_SA + "k_layernorm", te=True)),
               present=lambda spec, layer: spec.qk_layernorm and _attention(spec, layer)),
    # the gated delta net (``GatedDeltaNet``, the layers ``linear_attention_freq`` makes linear; built
    # from the transformer-engine spec only). In memory TP rank r's ``in_proj`` rows are
    # ``[q_r; k_r; v_r; z_r; beta_r; alpha_r]`` and its conv1d channels ``[q_r; k_r; v_r]``, each the
    # r-th contiguous 1/TP slice of its component (whole key heads and their value heads: the
    # checkpoint's TP axis is never the packed rows). megatron-core saves each component as a
    # global tensor of its own (``in_proj.weight.query``, ...), split over TP on dim 0; the output
    # norm (over one value head) replicated; A_log and dt_bias per value head. The input norm fused
    # into in_proj is ``input_norm``'s.
    ModuleKind("gated_delta_net", Scope.LAYER, (
        *(Param(f"{_SA}in_proj.weight.{c}", Split.COLUMN) for c in GDN_IN_PROJ),
        *(Param(f"{_SA}conv1d.weight.{c}", Split.COLUMN) for c in GDN_CONV),
        Param(_SA + "A_log", Split.COLUMN),
        Param(_SA + "dt_bias", Split.COLUMN),
        Param(_SA + "out_norm.weight"),
        Param(_SA + "out_proj.weight", Split.ROW),
    ), (Spelling(_SA + "in_proj"), Spelling(_SA + "out_norm", te=True), Spelling(_SA + "out_proj")), present=_gdn),
    # the Mamba-2 mixer (``MambaMixer``, a hybrid model's "M" layers). In memory TP rank r's
    # ``in_proj`` rows are ``[z_r; x_r; B_r; C_r; dt_r]`` and its conv1d channels ``[x_r; B_r; C_r]``:
    # z and x the r-th 1/TP of the inner width, B and C whole groups, dt whole heads. megatron-core
    # saves each component as a global tensor of its own (``in_proj.weight.z``, ..., its split factory),
    # split over TP on dim 0, so no key's TP axis is the packed rows (a naive split of the packed rows
    # mixes components). A_log, D and dt_bias per head, the gated norm's weight (groups of
    # inner / groups) split over TP with whole groups. The input norm fused into in_proj is
    # ``input_norm``'s.
    ModuleKind("mamba_mixer", Scope.LAYER, (
        *(Param(f"{_MX}in_proj.weight.{c}", Split.COLUMN) for c in MAMBA_IN_PROJ),
        *(Param(f"{_MX}conv1d.{p}.{c}", Split.COLUMN) for p in (_W, _B) for c in MAMBA_CONV),
        Param(_MX + "A_log", Split.COLUMN),
        Param(_MX + "D", Split.COLUMN),
        Param(_MX + "dt_bias", Split.COLUMN),
        Param(_MX + "norm.weight", Split.COLUMN),
        Param(_MX + "out_proj.weight", Split.ROW),
    ), (Spelling(_MX + "in_proj"), Spelling(_MX + "out_proj")), present=_mamba),
    # the shared expert: a dense MLP split over TP, and its sigmoid gate (replicated)
    ModuleKind("shared_expert", Scope.LAYER,
               _linear(_MLP + "shared_experts.linear_fc1", Split.COLUMN, gated=True)
               + _linear(_MLP + "shared_experts.linear_fc2", Split.ROW) + (Param(_MLP + "shared_experts.gate_weight"),),
               (Spelling(_MLP + "shared_experts.linear_fc1"), Spelling(_MLP + "shared_experts.linear_fc2")),
               present=lambda spec, layer: spec.is_moe(layer) and bool(spec.moe_shared_ffn_hidden_size)),
    # the dense MLP, gated (SwiGLU) or plain
    ModuleKind("mlp", Scope.LAYER,
               _linear(_MLP + "linear_fc1", Split.COLUMN, gated=True, aliases=("mlp.dense_h_to_4h",))
               + _linear(_MLP + "linear_fc2", Split.ROW, aliases=("mlp.dense_4h_to_h",)),
               (Spelling(_MLP + "linear_fc1"), Spelling(_MLP + "linear_fc2")),
               present=lambda spec, layer: not spec.is_moe(layer) and _kind(spec, layer, "-")),
    # the norm before the MLP: fused into linear_fc1 (the local spec maps its keys there); an MoE
    # layer of the transformer-engine spec has no fused fc1: a TENorm of its own
    ModuleKind("pre_mlp_norm", Scope.LAYER,
               _norm(_MLP + "linear_fc1.layer_norm_", Spelling("pre_mlp_layernorm.", te=True, moe=True),
                     aliases=("pre_mlp_layernorm.", "post_attention_layernorm.", "post_attention_norm.")),
               (Spelling("pre_mlp_layernorm", te=True, moe=True),), present=lambda spec, layer: _kind(spec, layer, "-E")),
    # the router: its weight, its bias (--add-bias-linear) and the selection bias
    # (--moe-router-enable-expert-bias), replicated
    ModuleKind("router", Scope.LAYER, (Param(_MLP + "router.weight"), Param(_MLP + "router.bias"),
                                       Param(_MLP + "router.expert_bias")), present=_moe),
    # routed experts (one entry per expert; stored grouped, see ``EXPERT_SPELLINGS``), split over expert TP;
    # their biases (--add-bias-linear) only at expert TP 1 (``check_layout``)
    ModuleKind("experts", Scope.EXPERT, _linear("linear_fc1", Split.COLUMN, gated=True) + _linear("linear_fc2", Split.ROW),
               (Spelling(_MLP + "experts.experts.linear_fc1"), Spelling(_MLP + "experts.experts.linear_fc2")),
               present=_moe),
    # an MTP layer's own modules: the embedding's and the hidden state's norms, the projection of
    # both, and the final norm (TENorms in the transformer-engine spec)
    ModuleKind("mtp", Scope.MTP, (
        Param("enorm.weight", shape=lambda s: (s.hidden_size,)),
        Param("hnorm.weight", shape=lambda s: (s.hidden_size,)),
        Param("eh_proj.weight", Split.COLUMN, shape=lambda s: (s.hidden_size, 2 * s.hidden_size)),
        Param("final_layernorm.weight", shape=lambda s: (s.hidden_size,)),
    ), (Spelling("eh_proj"), Spelling("enorm", te=True), Spelling("hnorm", te=True), Spelling("final_layernorm", te=True)),
        present=lambda spec, layer: bool(spec.mtp_num_layers)),
    ModuleKind("final_norm", Scope.MODEL, _norm("decoder.final_layernorm."),
               (Spelling("decoder.final_layernorm", te=True),), present=lambda spec, layer: not spec.hybrid_pattern),
    # a hybrid model's final norm (``MambaStack.final_norm``, always a TENorm)
    ModuleKind("hybrid_final_norm", Scope.MODEL, _norm("decoder.final_norm."), (Spelling("decoder.final_norm"),),
               present=lambda spec, layer: bool(spec.hybrid_pattern)),
    # the output layer's (empty) ``_extra_state``: ``GPTModel`` leaves it out of its save, the hybrid
    # ``MambaModel`` keeps it
    ModuleKind("output", Scope.MODEL, (Param("output_layer.weight", Split.VOCAB),), (Spelling("output_layer"),),
               present=lambda spec, layer: bool(spec.hybrid_pattern)),
)

# a routed expert's key in other versions and formats -> the canonical ``mlp.experts.{e}.<name>``
EXPERT_SPELLINGS = (
    re.compile(r"\.mlp\.experts\.local_experts\.(?P<e>\d+)\.(?P<rest>.+)$"),  # SequentialMLP module keys
    re.compile(r"\.mlp\.experts\.experts\.(?P<e>\d+)\.(?P<rest>.+)$"),  # singleton local shards
    re.compile(r"\.mlp\.experts\.(?P<rest>[a-z_0-9]+\.(?:weight|bias))(?P<e>\d+)$"),  # TEGroupedMLP weight{e}
)
# grouped expert tensors carry an expert axis after the layer axis (SequentialMLP and GroupedMLP alike)
_GROUPED_EXPERTS = ".mlp.experts.experts."
_STACKED = re.compile(r"^(?P<prefix>decoder\.layers\.)(?P<sub>[A-Za-z_].*)$")
_PER_LAYER = re.compile(r"^decoder\.layers\.(?P<layer>\d+)\.")
_MTP = re.compile(r"^mtp\.layers\.(?P<m>\d+)\.(?:transformer_layer\.)?(?P<sub>.+)$")
_LAYER = re.compile(r"^decoder\.layers\.(?P<layer>\d+)\.(?P<sub>.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(?P<expert>\d+)\.(?P<rest>.+)$")


def _index() -> dict[tuple[bool, str], tuple[ModuleKind, Param]]:
    """(per expert?, canonical name) -> its entry and param; names of MODEL, LAYER and MTP scope
    share one namespace (they never clash), a routed expert's names have their own."""
    out: dict[tuple[bool, str], tuple[ModuleKind, Param]] = {}
    for kind in CATALOGUE:
        for param in kind.params:
            key = (kind.scope is Scope.EXPERT, param.name)
            if key in out and out[key][1] != param:
                raise AssertionError(f"catalogue: {param.name} is described twice, differently")
            out[key] = (kind, param)
    return out


_PARAMS = _index()
_MTP_OWN = tuple(p.name.split(".")[0] + "." for k in CATALOGUE if k.scope is Scope.MTP for p in k.params)

def _aliases() -> dict[str, tuple[str, bool]]:
    """A layer tensor's other keys -> (its canonical name, whether the key means it in MLA models
    only: outside them ``self_attention.q_layernorm`` is the per-head q norm, not MLA's latent one)."""
    out: dict[str, tuple[str, bool]] = {}
    for kind in CATALOGUE:
        for param in kind.params if kind.scope is Scope.LAYER else ():
            out.update({s.key: (param.name, bool(s.mla)) for s in param.spellings})
            out.update({alias: (param.name, False) for alias in param.aliases})
    return out


_ALIASES = _aliases()


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


def per_layer_keys(moe_layer_freq: object, experts: bool, linear_attention_freq: object = None) -> bool:
    """Whether megatron-core saves per-layer keys: MoE with ``moe_layer_freq`` a list or an int > 1,
    or gated delta net layers (``linear_attention_freq`` a list or an int > 1)."""
    def varies(freq: object) -> bool:
        if isinstance(freq, str) and freq.strip().isascii() and freq.strip().isdigit():
            freq = int(freq)
        return freq is not None and not (isinstance(freq, int) and freq == 1)

    return (experts and varies(moe_layer_freq)) or varies(linear_attention_freq)


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


def param_of(name: str) -> Param | None:
    """The catalogue's ``Param`` of a canonical per-layer, per-expert or model tensor name, or None."""
    layer, sub = split_name(name)
    expert, rest = split_expert(sub) if layer is not None else (None, sub)
    found = _PARAMS.get((expert is not None, rest))
    return found[1] if found else None


def known(name: str) -> bool:
    """Whether the catalogue knows where megatron-core keeps the per-layer (or top-level) tensor."""
    return param_of(name) is not None


def canonical(name: str, mla: bool = False) -> str:
    """A stored per-layer name in its canonical spelling (the transformer-engine spec's fused one):
    ``input_layernorm.*`` -> ``self_attention.linear_qkv.layer_norm_*``, ``pre_mlp_layernorm.*``
    -> ``mlp.linear_fc1.layer_norm_*``, the legacy GPT's names, and (``mla``: in MLA models only)
    the local spec's latent norms -> the up projections' ``layer_norm_weight``."""
    layer, sub = split_name(name)
    if layer is None or sub not in _ALIASES:
        return name
    canon, mla_only = _ALIASES[sub]
    return f"decoder.layers.{layer}.{canon}" if mla or not mla_only else name


def spellings(sub: str) -> tuple[str, ...]:
    """Every key a layer tensor is saved under (its canonical name first), whatever the spec."""
    canon = _ALIASES.get(sub, (sub, False))[0]
    return (canon, *(alias for alias, (c, _) in _ALIASES.items() if c == canon))


def vocab_names() -> tuple[str, ...]:
    """The model tensors holding a row per (padded) vocab entry."""
    return tuple(p.name for k in CATALOGUE if k.scope is Scope.MODEL for p in k.params if p.split is Split.VOCAB)


def mtp_params(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """An MTP layer's own tensors (relative names) and their shapes."""
    return {p.name: p.shape(spec) for k in CATALOGUE if k.scope is Scope.MTP for p in k.params}


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
            problems.append(f"num_layers {spec.num_layers} is not divisible by PP {pp}" + (
                " (megatron-core's hybrid stack would build num_layers // PP layers per stage and silently drop the "
                "last ones)" if spec.hybrid_pattern else ""))
        for what, n in (("num_attention_heads", spec.num_attention_heads), ("num_query_groups", spec.num_query_groups),
                        ("ffn_hidden_size", spec.ffn_hidden_size), ("padded vocab", spec.padded_vocab_size),
                        ("the shared expert's ffn size", spec.moe_shared_ffn_hidden_size or 0)):
            if n % tp:
                problems.append(f"{what} {n} is not divisible by TP {tp}")
        if spec.linear_attention:  # the gated delta net's heads (megatron-core asserts both)
            for what, n in (("linear_num_key_heads", spec.linear_num_key_heads),
                            ("linear_num_value_heads", spec.linear_num_value_heads)):
                if n % tp:
                    problems.append(f"{what} {n} is not divisible by TP {tp}")
        if spec.num_experts:
            if spec.num_experts % ep:
                problems.append(f"num_experts {spec.num_experts} is not divisible by EP {ep}")
            if (spec.moe_ffn_hidden_size or spec.ffn_hidden_size) % etp:
                problems.append(f"moe_ffn_hidden_size {spec.moe_ffn_hidden_size} is not divisible by expert TP {etp}")
            if spec.add_bias_linear and etp != 1:  # TransformerConfig asserts it (0.16.1 to 0.19)
                problems.append(f"expert biases (add_bias_linear) need expert TP 1, not {etp} (megatron-core: \"Bias in "
                                "Moe is only supported when ETP==1\"; pass --expert-tensor-parallel-size 1)")
        elif ep != 1 or etp != tp:
            problems.append("EP and expert TP need a model with experts")
        if spec.hybrid_pattern:  # the Mamba mixer's heads and groups (megatron-core asserts both)
            for what, n in (("mamba_num_heads", spec.mamba_num_heads), ("mamba_num_groups", spec.mamba_num_groups)):
                if n % tp:
                    problems.append(f"{what} {n} is not divisible by TP {tp}")
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
        key, lead, lead_shape = key_of(name, spec, target), (), ()
    else:
        key, lead, lead_shape = key_of(f"decoder.layers.{sub}", spec, target, layer), (layer,), (spec.num_layers,)
    expert, rest = split_expert(sub) if layer is not None else (None, sub)
    if expert is None:
        param = param_of(name)
        split = param.split if param else Split.REPLICATED
        boxes = _tp_boxes(name, shape, split.axis, target.tp, bool(param and param.gated) and spec.gated_mlp)
        return [Shard(key, name, lead_shape + shape, lead + _starts(box), box, lead_shape + frag, base + r)
                for box, frag, r in boxes]
    if not spec.num_experts:
        raise DistconvError(f"{name}: an expert tensor in a model without experts")
    experts, etp = spec.num_experts, target.expert_tp
    local = experts // target.ep
    key = key.replace(f"mlp.experts.{expert}.", "mlp.experts.experts.")
    global_shape = lead_shape + (experts,) + shape
    rank = base + etp * (expert // local)  # expert ranks: ETP innermost, then EP (Megatron-LM's order)
    param = param_of(name)
    split = param.split if param else Split.REPLICATED
    boxes = _tp_boxes(name, shape, split.axis, etp, bool(param and param.gated) and spec.gated_mlp)
    if not target.grouped_gemm:  # one chunk per expert
        return [Shard(key, name, global_shape, lead + (expert,) + _starts(box), box, lead_shape + (experts,) + frag,
                      rank + r) for box, frag, r in boxes]
    if expert % local:
        return []
    parts = tuple(name.replace(f"mlp.experts.{expert}.", f"mlp.experts.{e}.") for e in range(expert, expert + local))
    return [Shard(key, name, global_shape, lead + (expert,) + _starts(box), (slice(0, local),) + box,
                  lead_shape + (target.ep,) + frag, rank + r, parts) for box, frag, r in boxes]


def key_of(name: str, spec: ModelSpec, target: Target, layer: int | None = None) -> str:
    """The checkpoint key of a canonical (per-layer or stacked) name at the target's spec."""
    if layer is None:
        layer, sub = split_name(name)
    else:
        sub = name.removeprefix("decoder.layers.")
    found = _PARAMS.get((False, sub)) if layer is not None else None
    if found:
        context = (spec.multi_latent_attention, target.te, spec.is_moe(layer), spec.is_linear_attention(layer),
                   _mamba(spec, layer))
        spelled = next((s.key for s in found[1].spellings if s.applies(*context)), None)
        if spelled is not None:
            name = name.removesuffix(sub) + spelled
    return mtp_key(name, spec.num_layers) if layer is not None and layer >= spec.num_layers else name


def mtp_key(key: str, num_layers: int) -> str:
    """The checkpoint key of an MTP layer's tensor named ``decoder.layers.{num_layers + m}.*``
    (``mtp_as_layer``'s inverse): ``mtp.layers.{m}.`` then its own module or ``transformer_layer.``."""
    layer, sub = split_name(key)
    return f"mtp.layers.{layer - num_layers}." + (sub if sub.startswith(_MTP_OWN) else f"transformer_layer.{sub}")


def _starts(box: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.start for s in box)


def _extra_paths(kind: ModuleKind, spec: ModelSpec, target: Target, layer: int | None) -> list[str]:
    context = (spec.multi_latent_attention, target.te, spec.is_moe(layer) if layer is not None else False,
               _gdn(spec, layer), _mamba(spec, layer))
    return [s.key for s in kind.extra_state if s.applies(*context)] if kind.present(spec, layer) else []


def extra_states(spec: ModelSpec, target: Target) -> list[ExtraState]:
    """One ``_extra_state`` object per linear layer (and routed expert) and transformer-engine norm
    the model has, saved by one rank of its stage."""
    experts = spec.num_experts or 0
    out = []
    for layer in range(spec.num_layers + spec.mtp_num_layers):
        base = layer_stage(layer, spec.num_layers, target.pp) * target.stage_ranks
        mtp = layer >= spec.num_layers
        if mtp:
            own = f"mtp.layers.{layer - spec.num_layers}."
            out += [ExtraState(f"{own}{path}._extra_state", (1,), (0,), base)
                    for kind in CATALOGUE if kind.scope is Scope.MTP for path in _extra_paths(kind, spec, target, layer)]
            prefix, shape, offsets = f"{own}transformer_layer.", (1,), (0,)
        elif target.per_layer:
            prefix, shape, offsets = f"decoder.layers.{layer}.", (1,), (0,)
        else:
            prefix, shape, offsets = "decoder.layers.", (spec.num_layers,), (layer,)
        out += [ExtraState(f"{prefix}{path}._extra_state", shape, offsets, base)
                for kind in CATALOGUE if kind.scope is Scope.LAYER for path in _extra_paths(kind, spec, target, layer)]
        lead_shape, lead = ((), ()) if target.per_layer or mtp else (shape, offsets)
        local = experts // target.ep if experts else 1
        out += [ExtraState(f"{prefix}{path}._extra_state", lead_shape + (experts,), lead + (e,),
                           base + target.expert_tp * (e // local))
                for e in range(experts)
                for kind in CATALOGUE if kind.scope is Scope.EXPERT for path in _extra_paths(kind, spec, target, layer)]
    last = (target.pp - 1) * target.stage_ranks
    return out + [ExtraState(f"{path}._extra_state", (1,), (0,), last)
                  for kind in CATALOGUE if kind.scope is Scope.MODEL for path in _extra_paths(kind, spec, target, None)]


def padded_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's padding: up to a multiple of ``make_vocab_size_divisible_by x TP``."""
    step = divisible_by * tp
    return -(-vocab // step) * step


def expert_name(name: str) -> str:
    """A per-expert tensor name in its canonical form ``...mlp.experts.{e}.linear_fc1.weight``."""
    for pattern in EXPERT_SPELLINGS:
        m = pattern.search(name)
        if m:
            return f"{name[: m.start()]}.mlp.experts.{m['e']}.{m['rest']}"
    return name


def mtp_as_layer(key: str, num_layers: int) -> str:
    """An MTP key under the engine's name for it: megatron-core's ``mtp.layers.{m}`` (its own tensors
    and its ``transformer_layer``'s) is named ``decoder.layers.{num_layers + m}``; other keys as they are."""
    m = _MTP.match(key)
    return f"decoder.layers.{num_layers + int(m['m'])}.{m['sub']}" if m else key


def items_of(tensor: TensorInfo, num_layers: int, num_experts: int | None = None) -> list[Part]:
    """Split a stored tensor into per-layer (and per-expert) items, named as stored (``canonical``
    gives the name the mappings use).

    Stacked ``decoder.layers.*`` keys have a leading layer axis; grouped expert keys
    (``mlp.experts.experts.*``) then an expert axis. Per-layer keys (``decoder.layers.{i}.*``,
    non-homogeneous models; MTP layers, see ``mtp_as_layer``) and per-expert keys keep their index
    in the name; a per-expert key of another version is named in the canonical per-expert form.
    """
    m = _STACKED.match(tensor.key)
    if m and tensor.shape and tensor.shape[0] == num_layers:
        layers = [((l,), f"{m['prefix']}{l}.{m['sub']}", l) for l in range(num_layers)]
        shape = tensor.shape[1:]
    else:
        name = mtp_as_layer(tensor.key, num_layers)
        per_layer = _PER_LAYER.match(name)
        layers = [((), name, int(per_layer["layer"]) if per_layer else None)]
        shape = tensor.shape
    items = []
    for index, name, layer in layers:
        head, grouped, tail = name.partition(_GROUPED_EXPERTS)
        if grouped and not tail[:1].isdigit() and num_experts and shape and shape[0] == num_experts:
            items += [
                Part(f"{head}.mlp.experts.{e}.{tail}", tensor.key, index + (e,), shape[1:], layer)
                for e in range(num_experts)
            ]
        else:
            items.append(Part(expert_name(name), tensor.key, index, shape, layer))
    return items


COUNTS = ("num_layers", "mtp_num_layers", "num_experts")  # what ``stored_counts`` counts, as args name it
_EXPERT_NUMBER = re.compile(r"\.mlp\.experts\.(?P<e>\d+)\.")


def stored_counts(tensors: Iterable[TensorInfo]) -> tuple[dict[str, int], dict[str, set[int]]]:
    """The decoder layers, MTP layers and experts (``COUNTS``) stored tensors hold, from their keys
    and shapes alone: how many the stacked keys' axes hold (the layer axis first, a grouped expert
    axis next), and the numbers the other keys carry (a per-expert key of any version counted by its
    expert)."""
    extent, numbers = dict.fromkeys(COUNTS, 0), {name: set() for name in COUNTS}
    for info in tensors:
        key = info.key
        stacked = bool(_STACKED.match(key))
        layer, mtp, expert = _PER_LAYER.match(key), _MTP.match(key), _EXPERT_NUMBER.search(expert_name(key))
        if stacked and info.shape:
            extent["num_layers"] = max(extent["num_layers"], info.shape[0])
        if layer:
            numbers["num_layers"].add(int(layer["layer"]))
        if mtp:
            numbers["mtp_num_layers"].add(int(mtp["m"]))
        if expert:
            numbers["num_experts"].add(int(expert["e"]))
        elif _GROUPED_EXPERTS in key and len(info.shape) > int(stacked):
            extent["num_experts"] = max(extent["num_experts"], info.shape[int(stacked)])
    return extent, numbers


def other_spellings(key: str) -> list[str]:
    """``key`` (a checkpoint key ending in a layer tensor's name) with that name spelled every other
    way it is saved (``spellings``); empty when the name has no other spelling."""
    spelled = sorted({*_ALIASES, *(canon for canon, _ in _ALIASES.values())}, key=len, reverse=True)
    sub = next((s for s in spelled if key.endswith("." + s)), None)
    return [] if sub is None else [key.removesuffix(sub) + s for s in spellings(sub) if s != sub]
