"""Deliberately wrong gpt-oss mappings (tests only), which the proofs must reject.

``wrong_mapping(name)`` makes export and import use a gpt-oss table with one expert rule broken,
and puts the real one back on exit:

- ``down_not_transposed``: ``down_proj`` is fc2 as stored, ``[H, F]``, where HF wants ``[F, H]``:
  with square experts (F == H, as the released models' 2880 x 2880) the shapes still agree, so
  only the numbers can tell (Megatron-Bridge #3162, #3271, #3743);
- ``gate_up_concatenated``: ``gate_up_proj`` is ``[gate; up]`` transposed, where HF interleaves
  gate and up by column: the same shape for any sizes.

Made the same way in both directions, each survives an HF -> Megatron -> HF round trip bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from distconv.directions import export, import_
from distconv.families import FAMILIES
from distconv.families.base import Transform
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


WRONG = {
    "down_not_transposed": ("linear_fc2.weight", Transform()),
    "gate_up_concatenated": ("linear_fc1.", _Concatenated()),
}


@contextlib.contextmanager
def wrong_mapping(name: str | None) -> Iterator[None]:
    """While active, export and import map gpt-oss with the broken rule ``name`` (None: nothing changes)."""
    if name is None:
        yield
        return
    part, transform = WRONG[name]
    rules = tuple(dataclasses.replace(r, transform=transform) if part in r.megatron and "{expert}" in r.megatron else r
                  for r in GPT_OSS.rules)
    wrong = dataclasses.replace(GPT_OSS, rules=rules)
    families = tuple(wrong if f is GPT_OSS else f for f in FAMILIES)
    with stand_ins([(export, "FAMILIES", families), (import_, "FAMILIES", families)]):
        yield
