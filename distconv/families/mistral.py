"""Mistral: Llama's weights, plus an optional sliding attention window."""

from __future__ import annotations

from distconv.families.llama import CONFIG_FIELDS, REQUIRES, RULES, spec_fields
from distconv.families.base import Family
from distconv.spec import ModelSpec


def _sliding_window(spec: ModelSpec) -> int | None:
    # Megatron's window_size=(left, 0) attends to left+1 tokens, HF's sliding_window counts them all
    return spec.window_size[0] + 1 if spec.window_size else None


MISTRAL = Family(
    architecture="MistralForCausalLM",
    config_class="MistralConfig",
    rules=RULES,
    requires={**REQUIRES, "window_size": lambda w: w is None or w[1] == 0},
    config_fields=CONFIG_FIELDS + (("sliding_window", _sliding_window),),
    detect=lambda spec: spec.window_size is not None,
    spec_fields=spec_fields(window_size=lambda c: (c.sliding_window - 1, 0) if c.sliding_window else None),
)
