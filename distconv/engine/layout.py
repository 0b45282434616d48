"""Where megatron-core's ``GPTModel.sharded_state_dict()`` puts each weight at a given TP x PP.

Import and reshard write checkpoints whose keys, global shapes and chunking are exactly what a
model built at the target layout saves and loads (checked in the tests against a real
``GPTModel``): stacked ``decoder.layers.*`` keys with a leading layer axis, column-parallel
tensors split on dim 0, row-parallel on dim 1, gated ``linear_fc1`` stored ``[gate; up]`` with
``2 x TP`` fragments, replicated norms saved once, and a ``None`` ``_extra_state`` object per
linear layer. This describes megatron-core's modules, not any model family.
"""

from __future__ import annotations

import dataclasses
import re

from distconv.errors import DistconvError
from distconv.spec import ModelSpec

_LAYER = re.compile(r"^decoder\.layers\.(?P<layer>\d+)\.(?P<sub>.+)$")
# per-layer sub-name (or top-level name) -> TP-split axis; anything else is replicated
TP_AXIS = {
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc1.bias": 0,
    "mlp.linear_fc2.weight": 1,
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
}
GATED = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")
# linear layers whose (empty, for the local and non-fp8 TE specs) extra state megatron-core saves
EXTRA_STATE = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


@dataclasses.dataclass(frozen=True)
class Shard:
    """One chunk of one checkpoint tensor as one target rank saves it."""

    key: str  # checkpoint key (stacked for layers)
    name: str  # per-layer Megatron name, e.g. decoder.layers.3.mlp.linear_fc1.weight
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]  # in the global tensor
    box: tuple[slice, ...]  # inside the per-layer tensor
    fragments: tuple[int, ...]
    target_rank: int  # tp_rank + TP * pp_rank

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.box)


@dataclasses.dataclass(frozen=True)
class ExtraState:
    key: str
    layer: int
    num_layers: int
    target_rank: int


def split_name(name: str) -> tuple[int | None, str]:
    """``decoder.layers.3.mlp.x`` -> (3, ``mlp.x``); top-level names -> (None, name)."""
    m = _LAYER.match(name)
    return (int(m["layer"]), m["sub"]) if m else (None, name)


def stage_of(name: str, num_layers: int, pp: int) -> int:
    layer, _ = split_name(name)
    if layer is not None:
        return layer // (num_layers // pp)
    return 0 if name.startswith("embedding.") else pp - 1


def check_layout(spec: ModelSpec, tp: int, pp: int) -> None:
    """The divisibility megatron-core itself asserts when it builds the model at TP x PP."""
    problems = []
    if tp < 1 or pp < 1:
        problems.append("sizes must be >= 1")
    else:
        if spec.num_layers % pp:
            problems.append(f"num_layers {spec.num_layers} is not divisible by PP {pp}")
        for what, n in (("num_attention_heads", spec.num_attention_heads), ("num_query_groups", spec.num_query_groups),
                        ("ffn_hidden_size", spec.ffn_hidden_size), ("padded vocab", spec.padded_vocab_size)):
            if n % tp:
                problems.append(f"{what} {n} is not divisible by TP {tp}")
    if problems:
        raise DistconvError(f"the model cannot be laid out at TP{tp} PP{pp}: " + "; ".join(problems))


def shards_of(name: str, shape: tuple[int, ...], spec: ModelSpec, tp: int, pp: int) -> list[Shard]:
    """The chunks of one per-layer tensor at TP x PP, each with the target rank that owns it."""
    layer, sub = split_name(name)
    key = f"decoder.layers.{sub}" if layer is not None else name
    stage = stage_of(name, spec.num_layers, pp)
    axis = TP_AXIS.get(sub)
    lead = (layer,) if layer is not None else ()
    lead_shape = (spec.num_layers,) if layer is not None else ()
    full = tuple(slice(0, s) for s in shape)

    def shard(box: tuple[slice, ...], frag: tuple[int, ...], tp_rank: int) -> Shard:
        return Shard(key, name, lead_shape + shape, lead + tuple(s.start for s in box), box,
                     lead_shape + frag, tp_rank + tp * stage)

    if axis is None:
        return [shard(full, (1,) * len(shape), 0)]
    if shape[axis] % tp:
        raise DistconvError(f"{name}: dim {axis} of size {shape[axis]} is not divisible by TP {tp}")
    frag = tuple(tp if a == axis else 1 for a in range(len(shape)))
    if sub in GATED and spec.gated_mlp:
        half = shape[0] // 2
        step = half // tp
        out = []
        for r in range(tp):
            for part in (0, 1):  # gate rows, then up rows
                rows = slice(part * half + r * step, part * half + (r + 1) * step)
                out.append(shard((rows,) + full[1:], (2 * tp,) + frag[1:], r))
        return out
    step = shape[axis] // tp
    return [
        shard(tuple(slice(r * step, (r + 1) * step) if a == axis else full[a] for a in range(len(shape))), frag, r)
        for r in range(tp)
    ]


def extra_states(spec: ModelSpec, tp: int, pp: int) -> list[ExtraState]:
    """One ``_extra_state`` object per linear layer and layer, saved by the stage's TP rank 0."""
    per_stage = spec.num_layers // pp
    return [
        ExtraState(f"decoder.layers.{sub}._extra_state", layer, spec.num_layers, tp * (layer // per_stage))
        for layer in range(spec.num_layers)
        for sub in EXTRA_STATE
    ]


def padded_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's padding: up to a multiple of ``make_vocab_size_divisible_by x TP``."""
    step = divisible_by * tp
    return -(-vocab // step) * step
