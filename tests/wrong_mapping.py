"""Deliberately wrong mappings (tests only), which the proofs must reject.

``wrong_mapping(name)`` makes export and import use a family's table with one rule broken, and
puts the real one back on exit. gpt-oss's experts:

- ``down_not_transposed``: ``down_proj`` is fc2 as stored, ``[H, F]``, where HF wants ``[F, H]``:
  with square experts (F == H, as the released models' 2880 x 2880) the shapes still agree, so
  only the numbers can tell (Megatron-Bridge #3162, #3271, #3743);
- ``gate_up_concatenated``: ``gate_up_proj`` is ``[gate; up]`` transposed, where HF interleaves
  gate and up by column: the same shape for any sizes.

Made the same way in both directions, each survives an HF -> Megatron -> HF round trip bit for bit.

DeepSeek-V3's router (Kimi-K2's, Moonlight's):

- ``expert_bias_zeroed``: ``e_score_correction_bias`` <-> ``router.expert_bias`` written as zeros
  both ways (Megatron-Bridge #4657): every name, shape and dtype is right.

Qwen3.5's gated delta net (dense ``Qwen3_5ForCausalLM``):

- ``out_norm_offset_missing``: ``linear_attn.norm`` (plain gamma) <-> megatron-core's zero-centred
  ``out_norm`` copied as stored, without the +1 (Megatron-Bridge's zero-centred norm mappings):
  every name, shape and dtype is right.

DeepSeek-V3.2's indexer:

- ``indexer_copied``: the DSA indexer's tensors copied as stored, without the RoPE row order or
  the ``wq_b`` gamma fold (``families.dsa``): the same shapes, and the same logits whenever the
  indexer's top-k covers the whole sequence.

Nemotron-H's Mamba mixer:

- ``mamba_z_x_swapped``: the packed ``in_proj`` read and written as ``[x; z; B; C; dt]``: the same
  shapes (z and x are both the mixer's inner width), the gate and the scanned input exchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from distconv.directions import export, import_
from distconv.families import FAMILIES
from distconv.families.base import Concat, Family, JointTransform, Transform
from distconv.families.deepseek_v3 import DEEPSEEK_V3
from distconv.families.dsa import DEEPSEEK_V32
from distconv.families.gpt_oss import GPT_OSS
from distconv.families.nemotron_h import NEMOTRON_H, _in_proj_rows
from distconv.families.qwen3_next import QWEN3_5
from distconv.megatron.model import stand_ins
from distconv.spec import ModelSpec


class _Concatenated(Transform):
    """fc1 ``[gate; up]`` <-> its transpose, gate and up left concatenated (biases as they are)."""

    def export(self, t: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        return (t.transpose(0, 1) if t.dim() == 2 else t,)

    def import_(self, ts: tuple[torch.Tensor, ...], spec: ModelSpec) -> torch.Tensor:
        (t,) = ts
        return t.transpose(0, 1) if t.dim() == 2 else t


class _Zeroed(Transform):
    """Zeros of the tensor's shape and dtype, both ways."""

    def export(self, t: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        return (torch.zeros_like(t),)

    def import_values(self, t: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
        return torch.zeros_like(t)


class _JointCopy(JointTransform):
    """Several tensors copied as they are, both ways."""

    def export(self, ts: tuple[torch.Tensor, ...], spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        return ts

    def import_(self, ts: tuple[torch.Tensor, ...], spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        return ts


class _ZXSwapped(Concat):
    """The Mamba in_proj with its first two components (z, x) in each other's place, both ways."""

    def export(self, ts: tuple[torch.Tensor, ...], spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        return super().export((ts[1], ts[0], *ts[2:]), spec)

    def import_(self, ts: tuple[torch.Tensor, ...], spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        x, z, *rest = super().import_(ts, spec)
        return (z, x, *rest)


# name -> (family, a part of the broken rules' Megatron names, the transform they get; None: a copy)
WRONG: dict[str, tuple[Family, str, Transform | None]] = {
    "down_not_transposed": (GPT_OSS, "{expert}.linear_fc2.weight", Transform()),
    "gate_up_concatenated": (GPT_OSS, "{expert}.linear_fc1.", _Concatenated()),
    "expert_bias_zeroed": (DEEPSEEK_V3, "mlp.router.expert_bias", _Zeroed()),
    "indexer_copied": (DEEPSEEK_V32, "core_attention.indexer.", None),
    "mamba_z_x_swapped": (NEMOTRON_H, "mixer.in_proj.weight.z", _ZXSwapped(_in_proj_rows)),
    "out_norm_offset_missing": (QWEN3_5, "self_attention.out_norm.weight", Transform()),
}


@contextlib.contextmanager
def wrong_mapping(name: str | None) -> Iterator[None]:
    """While active, export and import map the family with the broken rule ``name`` (None: nothing changes)."""
    if name is None:
        yield
        return
    family, part, transform = WRONG[name]
    rules = tuple(dataclasses.replace(r, transform=transform or (_JointCopy() if r.joint else Transform()))
                  if part in r.megatron else r for r in family.rules)
    assert rules != family.rules, name
    wrong = dataclasses.replace(family, rules=rules)
    families = tuple(wrong if f is family else f for f in FAMILIES)
    with stand_ins([(export, "FAMILIES", families), (import_, "FAMILIES", families)]):
        yield
