"""Deliberately wrong gpt-oss and DSA mappings (tests only), which the proofs must reject.

``wrong_mapping(name)`` makes export and import use a table with its rules broken, and puts the
real one back on exit:

- ``down_not_transposed``: ``down_proj`` is fc2 as stored, ``[H, F]``, where HF wants ``[F, H]``:
  with square experts (F == H, as the released models' 2880 x 2880) the shapes still agree, so
  only the numbers can tell (Megatron-Bridge #3162, #3271, #3743);
- ``gate_up_concatenated``: ``gate_up_proj`` is ``[gate; up]`` transposed, where HF interleaves
  gate and up by column: the same shape for any sizes;
- ``indexer_copied`` (DeepSeek-V3.2): the DSA indexer's tensors copied as stored, without the
  RoPE row order or the ``wq_b`` gamma fold (``families.dsa``): the same shapes, and the same
  logits whenever the indexer's top-k covers the whole sequence.

Made the same way in both directions, each survives an HF -> Megatron -> HF round trip bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from distconv.directions import export, import_
from distconv.families import FAMILIES
from distconv.families.base import JointTransform, Transform
from distconv.families.dsa import DEEPSEEK_V32
from distconv.families.gpt_oss import GPT_OSS
from distconv.megatron.model import stand_ins
from distconv.spec import ModelSpec


class _Concatenated(Transform):
    """fc1 ``[gate; up]`` <-> its transpose, gate and up left concatenated (biases as they are)."""

    def export(self, t: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        return (t.transpose(0, 1) if t.dim() == 2 else t,)

    def import_(self, ts: tuple[torch.Tensor, ...], spec: ModelSpec) -> torch.Tensor:
        (t,) = ts
        return t.transpose(0, 1) if t.dim() == 2 else t


class _JointCopy(JointTransform):
    """Several tensors copied as they are, both ways."""

    def export(self, ts: tuple[torch.Tensor, ...], spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        return ts

    def import_(self, ts: tuple[torch.Tensor, ...], spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        return ts


# name -> (family, the part of the Megatron names whose rules break, with "{expert}" in them only?, transform)
WRONG = {
    "down_not_transposed": (GPT_OSS, "linear_fc2.weight", True, Transform()),
    "gate_up_concatenated": (GPT_OSS, "linear_fc1.", True, _Concatenated()),
    "indexer_copied": (DEEPSEEK_V32, "core_attention.indexer.", False, None),
}


@contextlib.contextmanager
def wrong_mapping(name: str | None) -> Iterator[None]:
    """While active, export and import map with the broken rules ``name`` (None: nothing changes)."""
    if name is None:
        yield
        return
    family, part, experts_only, transform = WRONG[name]

    def broken(r):
        copy = transform or (_JointCopy() if r.joint else Transform())
        return dataclasses.replace(r, transform=copy) if part in r.megatron and (
            "{expert}" in r.megatron or not experts_only) else r

    wrong = dataclasses.replace(family, rules=tuple(broken(r) for r in family.rules))
    families = tuple(wrong if f is family else f for f in FAMILIES)
    with stand_ins([(export, "FAMILIES", families), (import_, "FAMILIES", families)]):
        yield
