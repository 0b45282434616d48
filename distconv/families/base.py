"""The vocabulary of declarative mappings: name rules, tensor transforms, model families.

A family is data: a table of ``Rule``s (Megatron name pattern -> HF name patterns, with a
transform), the ``ModelSpec`` values it can express, and a table of HF config fields. The same
table serves export (Megatron -> HF) and import (HF -> Megatron). Everything here is pure: no
I/O, no collectives, and it works on ``meta`` tensors, which is how the plan learns the output
names and shapes before any byte is read.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from distconv.errors import DistconvError
from distconv.hf.fp8 import SCALE, quantize
from distconv.hf.mxfp4 import BLOCKS, SCALES, quantize as quantize_mxfp4
from distconv.spec import ModelSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig

Tensors = tuple[torch.Tensor, ...]


class Transform:
    """Turns one Megatron tensor into HF tensors (``export``) and back (``import_`` and ``import_values``).

    ``import_`` only places rows (import reads each Megatron row from the HF row it is made of:
    ``directions.import_.read_shard`` runs it on row numbers); ``import_values`` then changes the
    values, element by element, where the two formats store them differently (``NormOffset``).
    """

    def export(self, t: torch.Tensor, spec: ModelSpec) -> Tensors:
        return (t,)

    def import_(self, ts: Tensors, spec: ModelSpec) -> torch.Tensor:
        return ts[0]

    def import_values(self, t: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
        return t


class JointTransform:
    """Several Megatron tensors and the HF tensors made of them all, mapped together (a ``Rule``
    with ``joint`` names): ``export`` takes the Megatron tensors in the rule's order, ``import_``
    gives them back, placing rows only (see ``Transform``)."""

    def export(self, ts: Tensors, spec: ModelSpec) -> Tensors:
        raise NotImplementedError

    def import_(self, ts: Tensors, spec: ModelSpec) -> Tensors:
        raise NotImplementedError


class Concat(JointTransform):
    """One HF tensor that is several Megatron tensors stacked on their rows (``rows(spec)`` rows each):
    Nemotron-H's Mamba ``in_proj`` and ``conv1d``, Qwen3.5's ``in_proj_qkv``, the gated delta net's ``conv1d``."""

    def __init__(self, rows: Callable[[ModelSpec], tuple[int, ...]]) -> None:
        self.rows = rows

    def export(self, ts: Tensors, spec: ModelSpec) -> Tensors:
        return (torch.cat(ts, dim=0),)

    def import_(self, ts: Tensors, spec: ModelSpec) -> Tensors:
        (t,) = ts
        return tuple(t.split(list(self.rows(spec)), dim=0))


class SplitQKV(Transform):
    """Megatron's fused ``linear_qkv`` is grouped per KV head: ``[q_g (r heads), k_g, v_g] x ng``."""

    def export(self, t: torch.Tensor, spec: ModelSpec) -> Tensors:
        ng, hd = spec.num_query_groups, spec.head_dim
        r = spec.num_attention_heads // ng
        rest = t.shape[1:]
        w = t.reshape(ng, r + 2, hd, *rest)
        return (
            w[:, :r].reshape(ng * r * hd, *rest),
            w[:, r].reshape(ng * hd, *rest),
            w[:, r + 1].reshape(ng * hd, *rest),
        )

    def import_(self, ts: Tensors, spec: ModelSpec) -> torch.Tensor:
        ng, hd = spec.num_query_groups, spec.head_dim
        r = spec.num_attention_heads // ng
        q, k, v = ts
        rest = q.shape[1:]
        grouped = (q.reshape(ng, r, hd, *rest), k.reshape(ng, 1, hd, *rest), v.reshape(ng, 1, hd, *rest))
        return torch.cat(grouped, dim=1).reshape(ng * (r + 2) * hd, *rest)


class SplitGateUp(Transform):
    """Gated ``linear_fc1`` is stored ``[gate; up]`` (independent of TP in torch_dist)."""

    def export(self, t: torch.Tensor, spec: ModelSpec) -> Tensors:
        gate, up = t.chunk(2, dim=0)
        return gate, up

    def import_(self, ts: Tensors, spec: ModelSpec) -> torch.Tensor:
        return torch.cat(ts, dim=0)


class VocabRows(Transform):
    """Embedding/output rows: drop Megatron's vocab padding on export, pad with zeros on import."""

    def export(self, t: torch.Tensor, spec: ModelSpec) -> Tensors:
        return (t[: spec.vocab_size or t.shape[0]],)

    def import_(self, ts: Tensors, spec: ModelSpec) -> torch.Tensor:
        (t,) = ts
        pad = spec.padded_vocab_size - t.shape[0]
        return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t


COPY = Transform()
QKV = SplitQKV()
GATE_UP = SplitGateUp()
VOCAB = VocabRows()

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@functools.lru_cache(maxsize=None)
def _compile(pattern: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(pattern)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>\\d+)" for i, p in enumerate(parts))
    return re.compile(regex + "$")


@dataclasses.dataclass(frozen=True)
class Rule:
    """A Megatron name (canonical: the catalogue's, with ``{layer}`` and ``{expert}``) <-> ``hf`` names."""

    megatron: str
    hf: str | tuple[str, ...]
    transform: Transform = COPY
    fp8: bool = False  # the HF tensors are linear weights that block-wise FP8 releases quantize
    # float32 on both sides whatever the model's dtype (megatron-core's router ``expert_bias``,
    # transformers' ``e_score_correction_bias``): exported and imported as float32
    float32: bool = False
    # transformers saves the HF tensor float32 in a model of any dtype (``_keep_in_fp32_modules``);
    # Megatron keeps the model's dtype: a float32 copy in a bf16 folder does not make it mixed
    hf_float32: bool = False
    # an HF name (with ``{layer}``) repeating the rule's one HF tensor in every MTP layer: DeepSeek's
    # releases store the shared embedding and output head again in each MTP layer
    mtp_copy: str | None = None
    # further Megatron names the (``JointTransform``) transform takes with ``megatron``, in its order:
    # HF tensors each made of several Megatron ones (Qwen3-Next's grouped ``in_proj_qkvz``)
    joint: tuple[str, ...] = ()
    # the HF tensors hold every routed expert of the layer (gpt-oss): expert {expert}'s tensors
    # are their slab [expert] along the first axis, which the transform maps
    stacked: bool = False
    # the HF tensors are ``[..., in, out]`` weights that MXFP4 releases store as ``_blocks`` and
    # ``_scales``, transposed (``hf.mxfp4``)
    mxfp4: bool = False
    # the transform's import is not row-wise (a joint rule whose values mix its HF tensors: the DSA
    # indexer's query weight folds the latent q norm's weight): import reads the HF tensors whole
    whole: bool = False
    # with ``fp8``: the indices of the rule's HF tensors that stay unquantized (a joint rule's norm)
    fp8_keep: tuple[int, ...] = ()
    # a hybrid model's layer symbols the rule maps ("": every layer): where several rules share an HF
    # name (Nemotron-H's ``norm.weight``, each layer's one norm), import reads it into each layer's own
    kinds: str = ""

    def maps_layer(self, spec: ModelSpec, layer: int | None) -> bool:
        """Whether the rule maps layer ``layer`` of ``spec`` (``kinds``)."""
        kind = spec.layer_kind(layer)
        return not self.kinds or kind is None or kind in self.kinds

    def mtp_copies(self, spec: ModelSpec) -> tuple[str, ...]:
        """The HF names of this rule's copies in ``spec``'s MTP layers."""
        if self.mtp_copy is None:
            return ()
        return tuple(self.mtp_copy.format(layer=spec.num_layers + m) for m in range(spec.mtp_num_layers))

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,) if isinstance(self.hf, str) else self.hf

    @property
    def megatron_names(self) -> tuple[str, ...]:
        return (self.megatron, *self.joint)

    def match(self, name: str) -> dict[str, str] | None:
        for pattern in self.megatron_names:
            m = _compile(pattern).match(name)
            if m:
                return m.groupdict()
        return None

    def import_rows(self, ts: Tensors, spec: ModelSpec, part: int = 0) -> torch.Tensor:
        """The Megatron tensor ``megatron_names[part]``'s rows from the HF tensors (``Transform.import_``)."""
        return self.transform.import_(ts, spec)[part] if self.joint else self.transform.import_(ts, spec)

    def import_values(self, t: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
        """``Transform.import_values`` (a joint transform places rows only)."""
        return t if self.joint else self.transform.import_values(t, spec)


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF architecture: its rules, what it can express, and how its config is built."""

    architecture: str
    config_class: str  # transformers' config class, by its name in ``transformers`` (imported when first needed)
    rules: tuple[Rule, ...]
    requires: dict[str, Any]  # ModelSpec field -> required value (or a predicate)
    config_fields: tuple[tuple[str, Callable[[ModelSpec], Any]], ...]  # HF field <- spec
    detect: Callable[[ModelSpec], bool] = lambda spec: True
    spec_fields: tuple[tuple[str, Callable[[PretrainedConfig], Any]], ...] = ()  # spec field <- HF config (import)
    nullable: tuple[str, ...] = ()  # HF fields where None is a value (written and compared), not "unset"
    # spec field <- the HF fields that spell it together in more than one way (Qwen-MoE's
    # decoder_sparse_step and mlp_only_layers): a given config is compared by the spec field it
    # reads as (``spec_fields``), not field by field
    spelled_by: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # HF name prefixes of tensors releases hold and no rule converts, and why (an import refuses a
    # folder holding them, saying so): Qwen3-Next's MTP layers
    unconverted: tuple[tuple[str, str], ...] = ()
    # what a conversion of ``spec`` either way should know though it is exact (transformers' model
    # computes otherwise than megatron-core's), and what only an export should (a server reading it otherwise)
    notes: Callable[[ModelSpec], list[str]] = lambda spec: []
    serving_notes: Callable[[ModelSpec], list[str]] = lambda spec: []
    # hub ``model_type``s transformers has no class for, whose ``config.json`` is this architecture's config
    # with fields of its own (Kimi-K2's ``kimi_k2``): read from JSON into ``config_class`` (``hf.source.read_config``)
    model_types: tuple[str, ...] = ()
    # releases keeping their MTP layer apart from the model's layers (Qwen3-Next's ``mtp.*``), as
    # ``(prefix, own)``: the rules name MTP layer m as HF layer ``num_layers + m`` (DeepSeek's layout);
    # here its own modules ``own`` (names after the layer's prefix) are ``prefix`` + name instead, and
    # its decoder layer ``{prefix}layers.{m}.``; one MTP layer only (``own`` are not numbered)
    mtp_apart: tuple[str, tuple[str, ...]] | None = None

    def hf_name(self, name: str, spec: ModelSpec) -> str:
        """An HF name as the rules make it, as the release spells it (``mtp_apart``)."""
        m = _HF_LAYER.match(name) if self.mtp_apart else None
        if m is None or int(m[1]) < spec.num_layers:
            return name
        prefix, own = self.mtp_apart
        rest = name[m.end():]
        return prefix + rest if rest in own else f"{prefix}layers.{int(m[1]) - spec.num_layers}.{rest}"

    def unsupported(self, spec: ModelSpec) -> list[str]:
        """Reasons this family cannot express ``spec`` exactly (empty when it can)."""
        reasons = []
        for field, need in self.requires.items():
            have = getattr(spec, field)
            ok = need(have) if callable(need) else have == need
            if not ok:
                reasons.append(f"{field}={have!r}")
        return reasons

    def hf_config(self, spec: ModelSpec, **tokens: int | None) -> PretrainedConfig:
        """The HF config for ``spec``; ``tokens`` (``bos_token_id=...``) are set as given, None included."""
        values = {name: fn(spec) for name, fn in self.config_fields}
        import transformers

        config = getattr(transformers, self.config_class)(**{k: v for k, v in values.items() if v is not None or k in self.nullable}, **tokens)
        config.architectures = [self.architecture]
        return config

    def spec_from_hf_config(self, config: PretrainedConfig, padded_vocab_size: int, dtype: torch.dtype) -> ModelSpec:
        """The inverse of ``hf_config`` (import): ``spec_fields`` read the HF config.

        The result is then checked both ways: the family must express it (``unsupported``) and
        the HF config rebuilt from it must agree with ``config`` (``check_config``), so an HF
        field this family cannot carry into Megatron is an error, not silently dropped.
        """
        values = {name: fn(config) for name, fn in self.spec_fields}
        spec = ModelSpec(**values, padded_vocab_size=padded_vocab_size, train_dtype=dtype)
        reasons = self.unsupported(spec)
        if reasons:
            raise DistconvError(f"{self.architecture} model cannot be expressed in Megatron exactly: {', '.join(reasons)}")
        self.check_config(config, spec)
        return spec

    def check_config(self, config: PretrainedConfig, spec: ModelSpec) -> None:
        """A user-given HF config must agree with the checkpoint on every architectural field."""
        conflicts = []
        spelled = {hf for _, fields in self.spelled_by for hf in fields}
        readers = dict(self.spec_fields)
        for field, fields in self.spelled_by:
            theirs = readers[field](config)
            if theirs != getattr(spec, field):
                conflicts.append(f"{'/'.join(fields)}: HF config {', '.join(f'{f}={_hf_value(config, f)!r}' for f in fields)} "
                                 f"means {field}={theirs!r}, checkpoint {getattr(spec, field)!r}")
        for name, fn in self.config_fields:
            if name in _ADVISORY_FIELDS or name in spelled:
                continue
            ours, theirs = fn(spec), _hf_value(config, name)
            if name == "vocab_size":
                if theirs > spec.padded_vocab_size:
                    conflicts.append(f"vocab_size: HF config {theirs} > checkpoint padded vocab {spec.padded_vocab_size}")
            elif name == "rope_scaling" and _rope(ours) != theirs:
                conflicts.append(f"rope scaling: HF config {theirs!r}, checkpoint {_rope(ours)!r}")
            elif name != "rope_scaling" and (ours is not None or name in self.nullable) and theirs != ours and not _close(theirs, ours):
                conflicts.append(f"{name}: HF config {theirs!r}, checkpoint {ours!r}")
        reader = readers.get("rope_scaling")
        if reader is not None and (spec.rope_scaling or {}).get("rope_type") == "yarn":  # YaRN: every setting, not type and factor only
            try:
                theirs = reader(config)
            except DistconvError as e:
                conflicts.append(f"rope scaling: {e}")
            else:
                ours = {k: v for k, v in spec.rope_scaling.items() if k != "rope_theta"}  # a config class may have added it
                if theirs != ours:
                    conflicts.append(f"rope scaling: HF config {theirs!r}, checkpoint {ours!r}")
        if conflicts:
            raise DistconvError("--hf-config conflicts with the checkpoint: " + "; ".join(conflicts))

    def rule_for(self, megatron_name: str) -> tuple[Rule, dict[str, str]]:
        for rule in self.rules:
            groups = rule.match(megatron_name)
            if groups is not None:
                return rule, groups
        raise DistconvError(f"{self.architecture} has no mapping for checkpoint tensor {megatron_name}")

    def holds_every_expert(self, hf_name: str) -> bool:
        """Whether HF tensor ``hf_name`` holds every routed expert of its layer (a ``Rule.stacked``
        rule's: its first axis is the expert)."""
        return any(_compile(h).match(hf_name) for rule in self.rules if rule.stacked for h in rule.hf_names)

    def slab_of(self, name: str, spec: ModelSpec) -> tuple[int, int] | None:
        """For a Megatron tensor whose HF tensors are stacked over experts (``Rule.stacked``): which
        slab of how many its HF tensors are (its expert, the model's experts); else None."""
        rule, groups = self.rule_for(name)
        return (int(groups["expert"]), int(spec.num_experts or 0)) if rule.stacked else None

    def export_tensor(self, name: str, t: torch.Tensor, spec: ModelSpec, fp8_rest: torch.dtype | None = None,
                      mxfp4_rest: torch.dtype | None = None) -> list[tuple[str, torch.Tensor]]:
        """Map one Megatron tensor (per-layer name) to its HF tensors (a stacked rule's: their slab),
        in ``t``'s dtype (float32 for ``Rule.float32``).

        With ``fp8_rest`` (``--dtype fp8``) the rule's quantized weights come out block-wise FP8,
        quantized from ``t``'s own precision and each followed by its ``_scale_inv``; every other
        tensor comes out in ``fp8_rest``. With ``mxfp4_rest`` (``--dtype mxfp4``) a ``Rule.mxfp4``
        weight ``[..., in, out]`` comes out as MXFP4 ``_blocks`` and ``_scales`` of its transpose, the
        rest in ``mxfp4_rest``.
        """
        rule, groups = self.rule_for(name)
        if rule.joint:
            raise DistconvError(f"internal: {name} maps together with {', '.join(rule.joint)} (export_tensors)")
        return self._outputs(name, rule, groups, rule.transform.export(t, spec), spec, fp8_rest, mxfp4_rest)

    def export_tensors(self, named: Sequence[tuple[str, torch.Tensor]], spec: ModelSpec,
                       fp8_rest: torch.dtype | None = None,
                       mxfp4_rest: torch.dtype | None = None) -> list[tuple[str, torch.Tensor, str]]:
        """``export_tensor`` over a unit's Megatron tensors: ``(HF name, tensor, Megatron name)``, a joint
        rule's HF tensors once all of its Megatron tensors are there (``group_of`` keeps them in one
        unit); one missing is an error naming it."""
        out: list[tuple[str, torch.Tensor, str]] = []
        waiting: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}  # a joint rule's names -> those seen
        for name, t in named:
            rule, groups = self.rule_for(name)
            if not rule.joint:
                out += [(hf, x, name) for hf, x in self.export_tensor(name, t, spec, fp8_rest, mxfp4_rest)]
                continue
            names = tuple(n.format(**groups) for n in rule.megatron_names)
            got = waiting.setdefault(names, {})
            got[name] = t
            if len(got) == len(names):
                exported = rule.transform.export(tuple(got[n] for n in names), spec)
                out += [(hf, x, name) for hf, x in self._outputs(name, rule, groups, exported, spec, fp8_rest, mxfp4_rest)]
                del waiting[names]
        for names, got in waiting.items():
            missing = [n for n in names if n not in got]
            raise DistconvError(f"the checkpoint holds {', '.join(got)} but not {', '.join(missing)}, which "
                                f"{self.architecture} maps together with it")
        return out

    def group_of(self, name: str) -> str:
        """The name a Megatron tensor is exported with: a joint rule's first name, else its own."""
        for rule in self.rules:
            groups = rule.match(name) if rule.joint else None
            if groups is not None:
                return rule.megatron.format(**groups)
        return name

    def _outputs(self, name: str, rule: Rule, groups: dict[str, str], out: Tensors, spec: ModelSpec,
                 fp8_rest: torch.dtype | None, mxfp4_rest: torch.dtype | None) -> list[tuple[str, torch.Tensor]]:
        named = [(self.hf_name(hf.format(**groups), spec), x) for hf, x in zip(rule.hf_names, out)]
        named += [(copy, named[0][1]) for copy in rule.mtp_copies(spec)]
        if rule.float32:
            return [(hf, x.float()) for hf, x in named]
        if mxfp4_rest is not None:
            if not rule.mxfp4:
                return [(hf, x.to(mxfp4_rest)) for hf, x in named]
            quantized = []
            for hf, x in named:
                blocks, scales = quantize_mxfp4(x.transpose(-1, -2), f"{hf} (from Megatron {name})")
                quantized += [(hf + BLOCKS, blocks), (hf + SCALES, scales)]
            return quantized
        if fp8_rest is None:
            return named
        if not rule.fp8:
            return [(hf, x.to(fp8_rest)) for hf, x in named]
        out = []
        for i, (hf, x) in enumerate(named):
            if i in rule.fp8_keep:
                out.append((hf, x.to(fp8_rest)))
                continue
            weight, scale = quantize(x)
            out += [(hf, weight), (hf + SCALE, scale)]
        return out

    @property
    def quantizable(self) -> bool:
        """Whether any rule is marked for block-wise FP8 (``--dtype fp8``)."""
        return any(r.fp8 for r in self.rules)

    @property
    def mxfp4(self) -> bool:
        """Whether any rule is marked for MXFP4 (``--dtype mxfp4``)."""
        return any(r.mxfp4 for r in self.rules)


def _rope(scaling: dict[str, Any] | None) -> tuple[str, float] | None:
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return scaling.get("rope_type", scaling.get("type")), float(scaling.get("factor", 1.0))


def _hf_value(config: PretrainedConfig, name: str) -> Any:
    """A config field, looking inside transformers v5's ``rope_parameters`` for RoPE settings."""
    rope = getattr(config, "rope_parameters", None) or {}
    if name in ("rope_theta", "partial_rotary_factor"):
        return getattr(config, name, None) or rope.get(name)
    if name == "rope_scaling":
        return _rope(getattr(config, "rope_scaling", None) or rope)
    if name == "head_dim" and getattr(config, "head_dim", None) is None:  # HF's default when unset
        return config.hidden_size // config.num_attention_heads
    return getattr(config, name, None)


def rope_from_hf(config: PretrainedConfig) -> dict[str, Any] | None:
    """HF RoPE scaling as ``ModelSpec.rope_scaling`` (what megatron-core can express), or an error."""
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    llama3 = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    if kind == "llama3" and all(float(scaling.get(k, v)) == v for k, v in llama3.items() if k not in ("rope_type", "factor")):
        return llama3
    raise DistconvError(f"RoPE scaling {scaling!r} has no megatron-core equivalent (supported: linear, llama3 with "
                        "low/high frequency factors 1/4 and original length 8192)")


def _close(a: Any, b: Any) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1)


# Fields that do not change the weights' meaning; a user's HF config may set them freely.
_ADVISORY_FIELDS = {"max_position_embeddings", "initializer_range", "torch_dtype", "bos_token_id", "eos_token_id"}


def pick_family(families: Sequence[Family], spec: ModelSpec | None = None, architecture: str | None = None, *,
                importing: bool = False) -> Family:
    """The family an HF architecture names (``--hf-config``'s, or the config an import reads), else
    the first whose ``detect`` accepts ``spec``. An export needs it to express ``spec`` exactly; an
    import needs its table to read HF configs (``spec_fields``)."""
    if architecture is not None or importing:
        by_name = {f.architecture: f for f in families}
        if architecture not in by_name:
            raise DistconvError(f"unsupported HF architecture {architecture}; supported: {', '.join(sorted(by_name))}")
        family = by_name[architecture]
    else:
        family = next(f for f in families if f.detect(spec))
    if importing:
        if not family.spec_fields:  # export only: no table reads its HF config yet
            importable = sorted(f.architecture for f in families if f.spec_fields)
            raise DistconvError(f"import of {architecture} is not supported yet (export is); importable: {', '.join(importable)}")
        return family
    reasons = family.unsupported(spec)
    if reasons:
        raise DistconvError(
            f"the checkpoint's model cannot be exported as {family.architecture} exactly: "
            f"{', '.join(reasons)} (unsupported combination)"
        )
    return family
