"""MXFP4 (``distconv.hf.mxfp4``): the quantizer against a reference written from the format's
definition, the dequantizer against transformers' own, and the source that reads a hub release.

The reference follows OCP Microscaling Formats (MX) v1.0 one block of 32 at a time, in Python
floats: the shared scale is ``2**(floor(log2(amax)) - emax)`` with E2M1's ``emax = 2``; each
element divided by it becomes the nearest E2M1 number (magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6),
ties to the even code, larger magnitudes saturating to 6, the sign kept; two codes per byte, the
even element in the low nibble (transformers' and vLLM's packing); the scale stored as its
exponent + 127.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distconv.errors import DistconvError
from distconv.hf import mxfp4
from distconv.hf.source import DequantizedMXFP4, SafetensorsFiles

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _ref_code(v: float) -> int:
    """One element, already divided by its block's scale: sign bit and nearest magnitude code."""
    sign = 8 if math.copysign(1.0, v) < 0 else 0
    m = min(abs(v), E2M1[-1])
    return sign | min(range(8), key=lambda c: (abs(m - E2M1[c]), c % 2))


def ref_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., K]`` -> (blocks uint8 ``[..., K/32, 16]``, scales uint8 ``[..., K/32]``), by the definition."""
    *lead, k = w.shape
    blocks, scales = [], []
    for block in w.double().reshape(-1, 32).tolist():
        amax = max(abs(x) for x in block)
        exponent = -127 if amax == 0 else max(-127, min(127, math.frexp(amax)[1] - 1 - 2))
        codes = [_ref_code(x / 2.0 ** exponent) for x in block]
        blocks.append([codes[i] | codes[i + 1] << 4 for i in range(0, 32, 2)])
        scales.append(exponent + 127)
    return (torch.tensor(blocks, dtype=torch.uint8).reshape(*lead, k // 32, 16),
            torch.tensor(scales, dtype=torch.uint8).reshape(*lead, k // 32))


def _cases() -> torch.Tensor:
    """Blocks of every kind: random values over many magnitudes, exact ties at every midpoint,
    saturation (7.9 in a block whose scale 4.0 sets), zeros and negative zeros, bf16's extremes."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(32, generator=gen) * 10.0 ** float(p) for p in range(-6, 7)]
    ties = torch.tensor([4.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 0.1])
    rows += [torch.cat([ties, ties * 1.0]), torch.cat([ties, -ties]) * 2.0 ** -20, torch.full((32,), 7.9).index_fill(0, torch.tensor([0]), 4.0)]
    rows += [torch.zeros(32), -torch.zeros(32), torch.cat([torch.full((16,), -1e-3), torch.full((16,), 3.0)])]
    rows += [torch.full((32,), 3e38) * torch.randn(32, generator=gen).sign(), torch.full((32,), 1e-39),
             torch.randn(32, generator=gen) * 1e-38]
    return torch.stack(rows).bfloat16().float()[None]  # [1, blocks, 32]


def test_quantizer_equals_the_definition():
    w = _cases()
    blocks, scales = mxfp4.quantize(w, "w")
    ref_blocks, ref_scales = ref_quantize(w)
    assert blocks.shape == (1, w.shape[1], 1, 16) and scales.shape == (1, w.shape[1], 1)
    assert torch.equal(scales, ref_scales) and torch.equal(blocks, ref_blocks)
    values = mxfp4.dequantize(blocks, scales, "w")
    assert values[0, 13, :8].tolist() == [4.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # ties to the even code
    assert values[0, 15].tolist() == [4.0] + [6.0] * 31  # 7.9 saturates
    assert torch.signbit(values[0, 17]).all() and (values[0, 17] == 0).all()  # -0 kept


def test_transformers_dequantizes_to_the_same_values_exactly_in_bf16():
    """transformers' ``convert_moe_packed_tensors`` (its CPU path for a hub release) gives the values
    ``dequantize`` gives, transposed as its expert parameters are, in float32 and in bfloat16."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = mxfp4.quantize(_cases(), "w")
    ours = mxfp4.dequantize(blocks, scales, "w")
    assert torch.equal(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32), ours.transpose(1, 2))
    assert torch.equal(convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16), ours.transpose(1, 2).bfloat16())
    assert torch.equal(ours.bfloat16().float(), ours)


def test_requantizing_what_it_dequantized_gives_the_same_bytes():
    """A release quantized by this rule survives dequantize -> quantize bit for bit (-0 included)."""
    blocks, scales = mxfp4.quantize(_cases(), "w")
    again = mxfp4.quantize(mxfp4.dequantize(blocks, scales, "w").bfloat16(), "w")
    assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_before_quantizing(bad):
    w = torch.zeros(2, 64)
    w[1, 5] = bad
    with pytest.raises(DistconvError, match="model.layers.0.mlp.experts.down_proj: 1 NaN or Inf values"):
        mxfp4.quantize(w, "model.layers.0.mlp.experts.down_proj")


def test_a_nan_scale_and_mismatched_shapes_are_refused():
    blocks, scales = mxfp4.quantize(torch.ones(2, 64), "w")
    scales[1, 0] = 255
    with pytest.raises(DistconvError, match="1 scales are 255"):
        mxfp4.dequantize(blocks, scales, "w")
    with pytest.raises(DistconvError, match="do not match"):
        mxfp4.dequantize(blocks, scales[:, :1], "w")
    with pytest.raises(DistconvError, match="multiple of 32"):
        mxfp4.quantize(torch.ones(2, 48), "w")


def _release(folder: Path, tensors: dict[str, torch.Tensor]) -> SafetensorsFiles:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return SafetensorsFiles(folder)


def test_the_source_reads_a_release_as_transformers_parameters(tmp_path):
    """``*_blocks`` ``[E, out, in/32, 16]`` and ``*_scales`` read as the bf16 parameter ``[E, in, out]``,
    whole or a box at a time; other tensors as they are."""
    w = torch.randn(3, 40, 64, generator=torch.Generator().manual_seed(1))  # [E, out, in]
    blocks, scales = mxfp4.quantize(w, "x")
    bias = torch.randn(3, 40).bfloat16()
    source = DequantizedMXFP4(_release(tmp_path / "a", {"e.down_proj_blocks": blocks, "e.down_proj_scales": scales,
                                                         "e.down_proj_bias": bias}), mxfp4.quantization_config())
    assert sorted(source.names()) == ["e.down_proj", "e.down_proj_bias"]
    assert source.shape("e.down_proj") == (3, 64, 40) and source.dtype("e.down_proj") == torch.bfloat16
    whole = mxfp4.dequantize(blocks, scales, "x").transpose(1, 2).bfloat16()
    assert torch.equal(source.read("e.down_proj", (slice(None),)), whole)
    assert torch.equal(source.read("e.down_proj", (slice(1, 2), slice(3, 9), slice(0, 7))), whole[1:2, 3:9, :7])
    assert torch.equal(source.read("e.down_proj_bias", (slice(0, 2),)), bias[:2])


@pytest.mark.parametrize("tensors,needle", [
    (lambda b, s: {"e.w_scales": s}, "e.w_scales is a scale of no tensor"),
    (lambda b, s: {"e.w_blocks": b}, "e.w_blocks has no e.w_scales"),
    (lambda b, s: {"e.w_blocks": b, "e.w_scales": s[:, :, :1].contiguous()}, "are not MXFP4's"),
    (lambda b, s: {"e.w_blocks": b.to(torch.int16), "e.w_scales": s}, "uint8, not I16"),
    (lambda b, s: {"e.w_blocks": b, "e.w_scales": s, "e.w": torch.zeros(1)}, "both as itself and as MXFP4"),
])
def test_the_source_refuses_a_broken_release(tmp_path, tensors, needle):
    blocks, scales = mxfp4.quantize(torch.ones(2, 4, 64), "x")
    with pytest.raises(DistconvError, match=needle):
        DequantizedMXFP4(_release(tmp_path / "b", tensors(blocks, scales)), mxfp4.quantization_config())


def test_quantization_config_is_what_transformers_and_vllm_read():
    """transformers' ``Mxfp4Config`` reads it back to the same dict; vLLM picks its gpt-oss MXFP4
    method from ``quant_method`` (checked on a folder in ``test_vllm``)."""
    from transformers.utils.quantization_config import Mxfp4Config

    config = mxfp4.quantization_config()
    assert Mxfp4Config.from_dict(json.loads(json.dumps(config))).to_dict() == config
