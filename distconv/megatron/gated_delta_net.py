"""megatron-core 0.16's gated delta net models (Qwen3-Next) built and run on a CPU without
transformer-engine, fla or Triton: what ``distconv.megatron.model`` changes while it does so.

megatron-core builds these models only from its transformer-engine block spec
(``get_transformer_block_with_experimental_attention_variant_spec``), and ``GatedDeltaNet``
refuses to exist without fla, whose two functions (``l2norm`` and the Triton kernel
``chunk_gated_delta_rule``) it calls in its forward pass. Stood in for, only while a model is built
or run (``model.build_gpt``, ``model.forward_logits``), and put back after:

- ``TESpecProvider`` (undefined without transformer-engine): a provider of megatron-core's local
  modules saved under transformer-engine's names, with transformer-engine's norms (``Norm``: TENorm,
  ``NormColumnParallelLinear``: TELayerNormColumnParallelLinear), whose zero-centred gamma
  (``layernorm_zero_centered_gamma``) computes ``x_hat * (1 + weight)``, as transformer-engine's
  ``zero_centered_gamma`` does; megatron-core's own torch norm refuses it;
- fla: ``HAVE_FLA``, ``l2norm`` (fla's ``x / sqrt(sum(x^2) + eps)``, written here) and
  ``chunk_gated_delta_rule``, for which megatron-core's own torch version is taken
  (``torch_chunk_gated_delta_rule``, what its ``deterministic_mode`` runs); ``causal_conv1d_fn``
  (CUDA-only) is left out, so megatron-core convolves with its own ``nn.Conv1d``. megatron-core
  0.19 (a package, ``ssm/gated_delta_net/``) keeps the same names in its ``common`` module and calls
  fla's ``causal_conv1d`` with no torch path but its ``deterministic_mode``: stood in by ``causal_conv1d``
  here, the same convolution.

Everything else in the forward pass is megatron-core's code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

Change = tuple[Any, str, Any]


class _EmptyExtraState:
    """The (empty) ``_extra_state`` transformer-engine 2's norms save; what is loaded is ignored."""

    def get_extra_state(self) -> None:
        return None

    def set_extra_state(self, state: Any) -> None:
        """Ignored: transformer-engine's norms keep no state a forward pass needs."""


def _normalize(x: torch.Tensor, normalization: str, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
               zero_centered: bool) -> torch.Tensor:
    """transformer-engine's RMSNorm or LayerNorm; with zero-centred gamma the stored weight is ``gamma - 1``."""
    gamma = weight + 1 if zero_centered else weight
    if normalization == "LayerNorm":
        return F.layer_norm(x, x.shape[-1:], gamma, bias, eps)
    return F.rms_norm(x, x.shape[-1:], gamma, eps)


class Norm(_EmptyExtraState, torch.nn.Module):
    """``TENorm``'s stand-in: ``weight`` (and ``bias`` for LayerNorm), zero-centred gamma honoured."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.normalization, self.eps = config.normalization, eps
        self.zero_centered = config.layernorm_zero_centered_gamma
        self.weight = torch.nn.Parameter(
            (torch.zeros if self.zero_centered else torch.ones)(hidden_size, dtype=config.params_dtype))
        self.bias = (torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
                     if self.normalization == "LayerNorm" else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _normalize(x, self.normalization, self.weight, self.bias, self.eps, self.zero_centered)


def norm_column_parallel_linear() -> type:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    class NormColumnParallelLinear(ColumnParallelLinear):
        """``TELayerNormColumnParallelLinear``'s stand-in: megatron-core's ``ColumnParallelLinear``
        after a norm whose parameters are its own ``layer_norm_weight`` (``layer_norm_bias``),
        replicated across TP (outside ``ColumnParallelLinear.sharded_state_dict``'s TP axis map)."""

        def __init__(self, input_size: int, output_size: int, *, config: Any, init_method: Any, gather_output: bool,
                     bias: bool, skip_bias_add: bool, is_expert: bool, skip_weight_param_allocation: bool = False,
                     tp_comm_buffer_name: str | None = None, tp_group: Any = None, stride: int = 1,
                     name: str | None = None) -> None:  # name: megatron-core 0.19's, a transformer-engine debug label
            super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                             gather_output=gather_output, stride=stride, skip_bias_add=skip_bias_add,
                             skip_weight_param_allocation=skip_weight_param_allocation, is_expert=is_expert,
                             tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group)
            self.normalization, self.eps = config.normalization, config.layernorm_epsilon
            self.zero_centered = config.layernorm_zero_centered_gamma
            self.layer_norm_weight = torch.nn.Parameter(
                (torch.zeros if self.zero_centered else torch.ones)(input_size, dtype=config.params_dtype))
            self.layer_norm_bias = (torch.nn.Parameter(torch.zeros(input_size, dtype=config.params_dtype))
                                    if self.normalization == "LayerNorm" else None)

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
            x = _normalize(x, self.normalization, self.layer_norm_weight, self.layer_norm_bias, self.eps,
                           self.zero_centered)
            return super().forward(x, *args, **kwargs)

    return NormColumnParallelLinear


def spec_provider() -> type:
    """``TESpecProvider``'s stand-in: megatron-core's local modules with transformer-engine's names,
    norms and sharding (experts: ``SequentialMLP``, whose chunks ``TEGroupedMLP`` saves too)."""
    from megatron.core.models.backends import BackendSpecProvider
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    fused = norm_column_parallel_linear()

    class Provider(BackendSpecProvider):
        def column_parallel_linear(self) -> type:
            return ColumnParallelLinear

        def row_parallel_linear(self) -> type:
            return RowParallelLinear

        def fuse_layernorm_and_linear(self) -> bool:
            return True

        def column_parallel_layer_norm_linear(self) -> type:
            return fused

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False) -> type:
            return Norm  # has_residual (0.19): transformer-engine fuses the residual only with fused_residual_rmsnorm

        def core_attention(self) -> type:
            return DotProductAttention

        def grouped_mlp_modules(self, moe_use_grouped_gemm: bool,
                                moe_use_legacy_grouped_gemm: bool | None = None) -> Any:
            if moe_use_legacy_grouped_gemm is None:  # megatron-core 0.19: one flag, a builder of SequentialMLP
                from megatron.core.models.backends import LocalSpecProvider

                return LocalSpecProvider().grouped_mlp_modules(moe_use_grouped_gemm)
            if moe_use_grouped_gemm and moe_use_legacy_grouped_gemm:
                from megatron.core.transformer.moe.experts import GroupedMLP

                return GroupedMLP, None
            return SequentialMLP, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)

        def activation_func(self) -> None:
            return None

    return Provider


def spec_changes() -> list[Change]:
    """While megatron-core builds the block spec: its transformer-engine provider is ``spec_provider``'s."""
    from megatron.core.models.gpt import experimental_attention_variant_module_specs as eav
    from megatron.core.models.gpt import gpt_layer_specs

    provider = spec_provider()
    return [(eav, "TESpecProvider", provider), (gpt_layer_specs, "TESpecProvider", provider)]


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """fla's ``l2norm``: ``x / sqrt(sum(x^2) + eps)`` over ``dim``, in float32."""
    return (x.float() * torch.rsqrt(x.float().square().sum(dim=dim, keepdim=True) + eps)).to(x.dtype)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
                  initial_state: Any = None, output_final_state: bool = False, cu_seqlens: Any = None) -> tuple[torch.Tensor, None]:
    """fla's ``causal_conv1d`` (megatron-core 0.19 calls it): a depthwise causal convolution of ``x``
    [batch, seq, dim] with ``weight`` [dim, width], then the activation, as megatron-core 0.16's
    ``nn.Conv1d`` path computes it; whole sequences only (no state, no packed sequences)."""
    if initial_state is not None or output_final_state or cu_seqlens is not None:
        raise NotImplementedError("causal_conv1d's stand-in takes whole, unpacked sequences only")
    width = weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=width - 1, groups=weight.shape[0])
    y = y[..., : x.shape[1]]
    return (F.silu(y) if activation in ("silu", "swish") else y).transpose(1, 2), None


def kernel_changes() -> list[Change]:
    """While a gated delta net model is built or run on the CPU: fla's two functions (``l2norm``;
    megatron-core's own ``torch_chunk_gated_delta_rule`` for the Triton kernel), and no
    ``causal_conv1d`` (megatron-core's own ``nn.Conv1d`` path; from 0.19, whose layer has none,
    ``causal_conv1d`` above)."""
    from megatron.core.ssm import gated_delta_net as gdn

    if hasattr(gdn, "gdn"):  # megatron-core 0.19: a package; the layer binds the kernels from its common module
        from megatron.core.ssm.gated_delta_net import common, gdn as layer

        return [(common, "HAVE_FLA", True), (common, "l2norm", l2norm),
                (layer, "chunk_gated_delta_rule", common.torch_chunk_gated_delta_rule),
                (layer, "causal_conv1d", causal_conv1d)]
    return [(gdn, "HAVE_FLA", True), (gdn, "l2norm", l2norm),
            (gdn, "chunk_gated_delta_rule", gdn.torch_chunk_gated_delta_rule), (gdn, "causal_conv1d_fn", None)]
