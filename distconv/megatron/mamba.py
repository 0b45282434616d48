"""megatron-core 0.16's hybrid models (``MambaModel``: Nemotron-H) built and run on a CPU without
transformer-engine, mamba_ssm or Triton: what ``distconv.megatron.model`` changes while it does so.

megatron-core ships one layer spec for these models, its transformer-engine one; ``stack_spec``
builds the same module tree from megatron-core's own classes with the transformer-engine stand-ins
of ``distconv.megatron.gated_delta_net`` (``TELayerNormColumnParallelLinear``'s, ``TENorm``'s), so
the checkpoint keys are transformer-engine's. ``MambaMixer`` refuses to exist without mamba_ssm, whose
gated RMSNorm it subclasses and whose Triton kernel (``mamba_split_conv1d_scan_combined``) its
forward pass calls. Stood in for, only while a model is built or run (``model.build_gpt``,
``model.forward_logits``), and put back after (``kernel_changes``), where mamba_ssm is absent:

- ``HAVE_MAMBA_SSM``;
- ``ExtendedRMSNorm``: ``GatedRMSNorm``, mamba_ssm's gated group RMSNorm written here (the gate
  ``silu(z)`` before or after normalising each group of ``group_size`` channels, in float32), saved
  split over TP on dim 0 as megatron-core's saves it;
- ``mamba_split_conv1d_scan_combined``: ``split_conv1d_scan``, the Mamba-2 layer's causal depthwise
  convolution, SiLU and selective scan written here in plain torch (the scan in its quadratic
  "state space duality" form: exact, memory ``batch x heads x length^2``);
- ``mamba_block.TENorm`` (the stack's final norm, hard-coded to transformer-engine's) where
  transformer-engine is absent.

Importing ``megatron.core.ssm.mamba_mixer`` imports a Triton module of megatron-core's dynamic
inference (``inference/contexts/attention_context/triton/tensor_ops.py``, ``import triton``) that no
forward pass here uses: without Triton, ``imported`` puts a module of three Nones in its place only
while ``mamba_mixer`` is first imported, and takes it out after. einops, which the mixer's forward
pass uses throughout, is a dependency. Everything else in the forward pass is megatron-core's code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from distconv.errors import DistconvError
from distconv.megatron import gated_delta_net

Change = tuple[Any, str, Any]

_TENSOR_OPS = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"


@contextlib.contextmanager
def imported() -> Iterator[None]:
    """While active, megatron-core's Mamba modules are importable without Triton (see the module's
    docstring); whatever this put in ``sys.modules`` is gone on exit."""
    if importlib.util.find_spec("einops") is None:
        raise DistconvError("megatron-core's Mamba mixer needs einops (pip install einops)")
    stub = importlib.util.find_spec("triton") is None and _TENSOR_OPS not in sys.modules
    if stub:
        module = types.ModuleType(_TENSOR_OPS, "distconv's stand-in: Triton is absent (dynamic inference only)")
        module.tensor_get_slice_after = module.tensor_masked_update = module.tensor_merge = None
        sys.modules[_TENSOR_OPS] = module
    try:
        importlib.import_module("megatron.core.ssm.mamba_mixer")  # bound to the stand-in's names once
        yield
    finally:
        if stub and sys.modules.get(_TENSOR_OPS) is module:
            del sys.modules[_TENSOR_OPS]


class GatedRMSNorm(torch.nn.Module):
    """mamba_ssm's gated RMSNorm (``layernorm_gated.RMSNorm``) as megatron-core's ``ExtendedRMSNorm``:
    ``norm(x * silu(z)) * weight`` (or ``norm(x) * weight * silu(z)`` with ``norm_before_gate``),
    each group of ``group_size`` channels normalised on its own, in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size or hidden_size, norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        out = x.float()
        if z is not None and not self.norm_before_gate:
            out = out * F.silu(z.float())
        groups = out.unflatten(-1, (-1, self.group_size))
        out = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight.float()
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.float())
        return out.to(x.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """The weight split over TP on dim 0 (whole groups per rank), as ``ExtendedRMSNorm`` saves it."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(), dp_cp_group=(metadata or {}).get("dp_cp_group"))


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """``[..., t, s] = a[..., s+1] + ... + a[..., t]`` for ``s <= t`` (-inf above the diagonal), summed
    directly rather than as differences of a running sum (which loses precision on long sequences)."""
    n = a.shape[-1]
    below = torch.ones(n, n, dtype=torch.bool, device=a.device).tril(-1)
    terms = a.unsqueeze(-1).expand(*a.shape, n).masked_fill(~below, 0.0)  # [..., r, s] = a_r where r > s
    sums = terms.cumsum(dim=-2)
    return sums.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=a.device).tril(), float("-inf"))


def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Mamba-2's scan, in float32: per head h (of group g), state ``S_t = exp(dt_t A_h) S_{t-1} +
    dt_t x_t B_t[g]^T`` and output ``y_t = S_t C_t[g]``, computed as ``y_t = sum_{s<=t} (C_t . B_s)
    exp(A_h (dt_{s+1} + ... + dt_t)) dt_s x_s``. x ``[b, l, heads, p]``, dt ``[b, l, heads]`` (after
    softplus), A ``[heads]``, B and C ``[b, l, groups, n]``."""
    heads, groups = x.shape[2], B.shape[2]
    B = B.float().repeat_interleave(heads // groups, dim=2)  # head h reads group h // (heads / groups)
    C = C.float().repeat_interleave(heads // groups, dim=2)
    decay = torch.exp(_segment_sums((dt * A.float()).transpose(1, 2)))  # [b, heads, t, s]
    scores = torch.einsum("bthn,bshn->bhts", C, B) * decay
    return torch.einsum("bhts,bsh,bshp->bthp", scores, dt, x.float())


def split_conv1d_scan(zxbcdt: torch.Tensor, conv1d_weight: torch.Tensor, conv1d_bias: torch.Tensor | None,
                      dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor | None = None, chunk_size: int = 256,
                      initial_states: Any = None, seq_idx: Any = None, dt_limit: tuple[float, float] = (0.0, float("inf")),
                      return_final_states: bool = False, activation: str = "silu", rmsnorm_weight: Any = None,
                      rmsnorm_eps: float = 1e-6, outproj_weight: Any = None, outproj_bias: Any = None,
                      headdim: int | None = None, ngroups: int = 1, norm_before_gate: bool = True) -> torch.Tensor:
    """mamba_ssm's ``mamba_split_conv1d_scan_combined`` as megatron-core calls it (no initial state,
    packed sequences, fused norm or output projection): ``zxbcdt [b, l, z | x B C | dt]`` -> the scan's
    output times ``silu(z)``, ``[b, l, heads x headdim]``. The chunk size only tiles the kernel's work."""
    if initial_states is not None or seq_idx is not None or return_final_states or rmsnorm_weight is not None \
            or outproj_weight is not None or activation not in ("silu", "swish"):
        raise NotImplementedError("distconv's CPU Mamba scan covers megatron-core's training-path call only")
    heads, channels, width = A.shape[0], conv1d_weight.shape[0], conv1d_weight.shape[-1]
    inner = zxbcdt.shape[-1] - channels - heads
    state = (channels - inner) // (2 * ngroups)
    z, xbc, dt = zxbcdt.split([inner, channels, heads], dim=-1)
    length = xbc.shape[1]
    xbc = F.conv1d(xbc.transpose(1, 2), conv1d_weight.reshape(channels, 1, width), conv1d_bias,
                   padding=width - 1, groups=channels)[..., :length].transpose(1, 2)  # causal, depthwise
    x, B, C = F.silu(xbc).split([inner, ngroups * state, ngroups * state], dim=-1)
    p = headdim or inner // heads
    x = x.unflatten(-1, (heads, p))
    dt = F.softplus(dt.float() + dt_bias.float()).clamp(*dt_limit)
    y = selective_scan(x, dt, A, B.unflatten(-1, (ngroups, state)), C.unflatten(-1, (ngroups, state)))
    if D is not None:
        y = y + (D.float()[:, None] if D.dim() == 1 else D.float()) * x.float()
    return (y.flatten(-2) * F.silu(z.float())).to(zxbcdt.dtype)


def kernel_changes() -> list[Change]:
    """While a hybrid model is built or run without mamba_ssm (transformer-engine): the stand-ins of
    the module's docstring."""
    from megatron.core.ssm import mamba_block, mamba_mixer

    changes: list[Change] = []
    if not mamba_mixer.HAVE_MAMBA_SSM or vars(mamba_mixer).get("mamba_split_conv1d_scan_combined") is None:
        changes += [(mamba_mixer, "HAVE_MAMBA_SSM", True), (mamba_mixer, "ExtendedRMSNorm", GatedRMSNorm),
                    (mamba_mixer, "mamba_split_conv1d_scan_combined", split_conv1d_scan)]
    if importlib.util.find_spec("transformer_engine") is None:  # in the stack's own module (0.19: models/hybrid/)
        changes.append((sys.modules[mamba_block.MambaStack.__module__], "TENorm", gated_delta_net.Norm))
    return changes


def stack_spec(config: Any) -> Any:
    """megatron-core's ``mamba_stack_spec`` (its transformer-engine hybrid layer spec) with
    megatron-core's own modules in transformer-engine's places: fused norm + linear layers, norms,
    and ``SequentialMLP`` experts (whose chunks ``TEGroupedMLP`` saves too)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (
        MoETransformerLayer, TransformerLayer, TransformerLayerSubmodules,
    )

    fused = gated_delta_net.norm_column_parallel_linear()
    bda = get_bias_dropout_add
    attention = ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                           submodules=SelfAttentionSubmodules(linear_qkv=fused, core_attention=DotProductAttention,
                                                              linear_proj=RowParallelLinear))
    mixer = ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(in_proj=fused, out_proj=RowParallelLinear))
    moe = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts or 1, moe_grouped_gemm=False)
    return ModuleSpec(module=MambaStack, submodules=MambaStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(mixer=mixer, mamba_bda=bda)),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            self_attention=attention, self_attn_bda=bda)),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fused, linear_fc2=RowParallelLinear)),
            mlp_bda=bda)),
        moe_layer=ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=gated_delta_net.Norm, mlp=moe, mlp_bda=bda)),
    ))
