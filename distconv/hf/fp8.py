"""Block-wise FP8 (the hub's ``quant_method: fp8`` format of DeepSeek-V3, Qwen3-*-FP8, ...).

A quantized 2-D weight ``W [out, in]`` is stored as ``float8_e4m3fn`` plus a float32
``<name>_scale_inv [ceil(out/bo), ceil(in/bi)]`` (blocks ``bo x bi``, 128 x 128 here; edge blocks
are partial): ``W ~= fp8 * scale_inv`` per block. On export a block's scale is its absolute
maximum / 448 (e4m3's largest finite value), and the FP8 value is ``W / scale`` rounded to
nearest by the cast. An all-zero block gets scale 1, so it dequantizes to exact zeros (any
positive scale would; 1 keeps the file free of denormal scales). A NaN or Inf is quantized to
FP8 NaN, and its block's scale comes from the block's finite values (the export counts the NaN
and refuses it unless ``--allow-nonfinite``).

Everything here is plain tensor math on the tensor's own device (``meta`` included, which is
how the plan learns the shapes).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from distconv.errors import DistconvError

BLOCK = (128, 128)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE = "_scale_inv"  # suffix of a quantized tensor's scale
BAND = 1 << 21  # elements quantized at a time (8 MB of float32: they stay in a CPU's cache)


def quantization_config() -> dict[str, Any]:
    """The ``config.json`` entry of the format, as the official releases write it."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, int]:
    """The ``_scale_inv`` shape of a 2-D weight of ``shape``."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def quantize(w: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` -> (FP8 weight, float32 scale_inv), computed in float32 where ``w`` is, a band
    of whole block rows (about ``BAND`` elements) at a time."""
    rows, cols = w.shape
    (bo, bi), (nr, nc) = block, scale_shape((rows, cols), block)
    q = torch.empty(rows, cols, dtype=FP8, device=w.device)
    scale = torch.empty(nr, nc, dtype=torch.float32, device=w.device)
    band = max(1, BAND // (bo * nc * bi))  # block rows per band
    for r0 in range(0, nr, band):
        r1 = min(nr, r0 + band)
        x = w[r0 * bo : r1 * bo].float()
        n = x.shape[0]
        x = torch.nn.functional.pad(x, (0, nc * bi - cols, 0, (r1 - r0) * bo - n)).view(r1 - r0, bo, nc, bi)
        amax = x.abs().amax(dim=(1, 3))  # NaN and Inf reach it
        finite = None if x.is_meta or bool(torch.isfinite(amax).all()) else torch.isfinite(x)
        if finite is not None:  # scales from the finite values alone, so the rest of each block stays right
            amax = torch.where(finite, x.abs(), 0).amax(dim=(1, 3))
        scale[r0:r1] = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        y = x / scale[r0:r1, None, :, None]
        if finite is not None:  # NaN and Inf come out as FP8 NaN (e4m3fn has no Inf; the cast would saturate it)
            y = torch.where(finite, y, torch.nan)
        q[r0 * bo : r0 * bo + n] = y.to(FP8).view((r1 - r0) * bo, nc * bi)[:n, :cols]
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, row0: int = 0, col0: int = 0,
               block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """float32 values of an FP8 box whose first element is at ``(row0, col0)`` of the whole weight.

    ``scale`` holds the scale rows and columns of the blocks the box touches, starting at block
    ``(row0 // bo, col0 // bi)``.
    """
    rows = (torch.arange(q.shape[0], device=q.device) + row0 % block[0]) // block[0]
    cols = (torch.arange(q.shape[1], device=q.device) + col0 % block[1]) // block[1]
    return q.float() * scale.float()[rows][:, cols]


def check_scale(name: str, weight_shape: tuple[int, ...], scale_shape_: tuple[int, ...] | None,
                block: tuple[int, int]) -> None:
    """A quantized weight must be 2-D with a scale of ``[ceil(out/bo), ceil(in/bi)]``; else an error naming it."""
    if scale_shape_ is None:
        raise DistconvError(f"tensor {name} is float8_e4m3fn but the source has no {name}{SCALE}: cannot dequantize it")
    if len(weight_shape) != 2:
        raise DistconvError(f"tensor {name} is float8_e4m3fn with shape {list(weight_shape)}: block-wise FP8 needs a 2-D weight")
    want = scale_shape(weight_shape, block)
    if tuple(scale_shape_) != want:
        raise DistconvError(f"{name}{SCALE} has shape {list(scale_shape_)}, but {name} {list(weight_shape)} in "
                            f"{block[0]}x{block[1]} blocks needs {list(want)}")
