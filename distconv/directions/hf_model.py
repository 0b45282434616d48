"""The tensors of an HF model folder, multi-token prediction layers included: what export must
produce and import must find."""

from __future__ import annotations

from typing import Any

import torch

from distconv.families import Family
from distconv.hf.source import expected_hf_tensors
from distconv.megatron.catalogue import mtp_params
from distconv.spec import ModelSpec

_LAYER = "decoder.layers.{layer}."


def hf_tensors(config: Any, family: Family, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a folder of ``config`` holds (tied aliases left out).

    transformers' model gives all but the MTP layers, which it does not build. They are laid out
    as DeepSeek's releases store them (what transformers' ``MtpModel`` and vLLM read), by the
    family's rules: HF layer ``num_layers + m`` holds a decoder layer like the last one, the MTP
    layer's own modules (their shapes the catalogue's), and the copies the rules repeat in every
    MTP layer (``Rule.mtp_copy``: the embedding and the output head; some releases, GLM-4.6's,
    leave these out); or apart from the model's layers, as ``Family.mtp_apart`` renames them
    (Qwen3-Next's ``mtp.*``).
    """
    expected = expected_hf_tensors(config)
    out = dict(expected)
    own = mtp_params(spec)
    last = spec.num_layers - 1
    for layer in range(spec.num_layers, spec.num_layers + spec.mtp_num_layers):
        for rule in family.rules:
            if not rule.megatron.startswith(_LAYER):
                copy = rule.mtp_copy.format(layer=layer) if rule.mtp_copy else None
                if copy and rule.hf_names[0] in expected:
                    out[copy] = expected[rule.hf_names[0]]
                continue
            sub = rule.megatron.removeprefix(_LAYER)
            for expert in range(spec.num_experts or 0) if "{expert}" in sub else (None,):
                where = {} if expert is None else {"expert": expert}
                names = [family.hf_name(hf.format(layer=layer, **where), spec) for hf in rule.hf_names]
                if sub in own:
                    meta = torch.empty(own[sub], device="meta")
                    out.update({n: tuple(t.shape) for n, t in zip(names, rule.transform.export(meta, spec))})
                else:
                    like = [hf.format(layer=last, **where) for hf in rule.hf_names]
                    out.update({n: expected[o] for n, o in zip(names, like) if o in expected})
    return out
