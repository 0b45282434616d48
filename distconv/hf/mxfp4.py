"""MXFP4 (the OCP Microscaling format's FP4, as gpt-oss's hub release stores its experts).

A weight ``W [..., out, in]`` is stored as two uint8 tensors: ``<name>_blocks [..., out, in/32, 16]``,
32 E2M1 values per block packed two to a byte (the even element in the low nibble, the odd one in
the high nibble), and ``<name>_scales [..., out, in/32]``, one E8M0 scale per block (``2**(s - 127)``).
An E2M1 code is a sign bit and a magnitude ``0, 0.5, 1, 1.5, 2, 3, 4, 6``; a value is its code's
number times its block's scale.

Quantizing follows the format's definition (OCP Microscaling Formats v1.0): a block's scale is
``2**(floor(log2(amax)) - 2)`` (2 is E2M1's largest exponent), each value divided by it is rounded to
the nearest E2M1 number, ties to the even code, beyond 6 saturating to 6; the sign is kept (a
negative value that rounds to zero is ``-0``). A block of zeros gets scale code 0. Dequantized values
are exact in bfloat16. NaN and Inf have no E2M1 form: quantizing them is an error (the caller
names the tensor); a stored scale of 255 (E8M0's NaN) is one when read.

transformers (``integrations.mxfp4``) and vLLM see gpt-oss's experts transposed: the HF parameter
``gate_up_proj [E, H, 2F]`` is stored as ``gate_up_proj_blocks [E, 2F, H/32, 16]``. Plain tensor
math here, in float32 on the tensor's device (``meta`` included: shapes only).
"""

from __future__ import annotations

from typing import Any

import torch

from distconv.errors import DistconvError

BLOCK = 32  # values per scale
BLOCKS, SCALES = "_blocks", "_scales"  # suffixes of a quantized tensor's two parts
# E2M1 magnitudes by code (the sign is bit 3); the midpoints between neighbours, and at which of
# them a tie rounds up (to the even code)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_MIDPOINTS = tuple((a + b) / 2 for a, b in zip(E2M1, E2M1[1:]))
_TIE_UP = tuple(i % 2 == 1 for i in range(len(_MIDPOINTS)))
NAN_SCALE = 255  # E8M0's NaN


def quantization_config() -> dict[str, Any]:
    """The ``config.json`` entry of gpt-oss's MXFP4 release (what transformers' own converter writes):
    attention, router, embedding and head stay in high precision."""
    return {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The blocks and scales shapes of a weight of ``shape`` (its last axis in blocks of 32)."""
    if not shape or shape[-1] % BLOCK:
        raise DistconvError(f"MXFP4 quantizes along a last axis that is a multiple of {BLOCK}, not {list(shape)}")
    groups = shape[-1] // BLOCK
    return (*shape[:-1], groups, BLOCK // 2), (*shape[:-1], groups)


def quantize(w: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., K]`` -> (blocks uint8 ``[..., K/32, 16]``, scales uint8 ``[..., K/32]``), blocks of 32
    along the last axis; NaN or Inf in ``w`` is an error naming ``name``."""
    blocks_shape, scales_shape = shapes(tuple(w.shape))
    if w.is_meta:
        return (torch.empty(blocks_shape, dtype=torch.uint8, device="meta"),
                torch.empty(scales_shape, dtype=torch.uint8, device="meta"))
    x = w.float().reshape(*scales_shape, BLOCK)
    if not bool(torch.isfinite(x).all()):
        bad = int(torch.isfinite(x).logical_not().sum())
        raise DistconvError(f"{name}: {bad} NaN or Inf values, which MXFP4 cannot hold; not quantized")
    amax = x.abs().amax(dim=-1)
    # floor(log2(amax)) exactly: amax = m * 2**e with m in [0.5, 1)
    exponent = torch.frexp(amax).exponent - 1 - 2
    exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, -127)).clamp(-127, 127)
    q = torch.ldexp(x, -exponent[..., None].to(torch.float32))  # exact: a power of two
    magnitude = q.abs()
    code = torch.zeros(q.shape, dtype=torch.uint8, device=q.device)
    for midpoint, tie_up in zip(_MIDPOINTS, _TIE_UP):
        code += (magnitude > midpoint) | ((magnitude == midpoint) & tie_up)
    code |= torch.signbit(q).to(torch.uint8) << 3
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks.reshape(blocks_shape), (exponent + 127).to(torch.uint8)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, name: str) -> torch.Tensor:
    """float32 values ``[..., K]`` of ``blocks [..., K/32, 16]`` and ``scales [..., K/32]``; a NaN
    scale (255) is an error naming ``name``."""
    if tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != BLOCK // 2:
        raise DistconvError(f"{name}: MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match")
    if bool((scales == NAN_SCALE).any()):
        raise DistconvError(f"{name}{SCALES}: {int((scales == NAN_SCALE).sum())} scales are 255 (E8M0's NaN)")
    lut = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(*scales.shape, BLOCK).to(torch.int64)
    values = torch.ldexp(lut[codes], (scales.to(torch.int32) - 127)[..., None].to(torch.float32))
    return values.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)


def check(name: str, blocks_shape: tuple[int, ...], scales_shape: tuple[int, ...] | None) -> None:
    """A quantized tensor's blocks must come with scales of one per 16 bytes; else an error naming it."""
    if scales_shape is None:
        raise DistconvError(f"{name}{BLOCKS} has no {name}{SCALES}: cannot dequantize it")
    if len(blocks_shape) < 2 or blocks_shape[-1] != BLOCK // 2 or tuple(blocks_shape[:-1]) != tuple(scales_shape):
        raise DistconvError(f"{name}{BLOCKS} {list(blocks_shape)} and {name}{SCALES} {list(scales_shape)} are not "
                            f"MXFP4's [..., K/{BLOCK}, {BLOCK // 2}] and [..., K/{BLOCK}]")
