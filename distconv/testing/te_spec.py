"""Transformer-engine's layer spec without transformer-engine (tests only).

megatron-core's own TE spec builders (``gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec``,
``get_gpt_decoder_block_spec(use_transformer_engine=True)``) decide the model's structure; only
the modules they pick from ``TESpecProvider`` and ``TENorm`` are replaced, by megatron-core's
local modules with the parameter names, sharding and ``_extra_state`` of TE's:

- ``column_parallel_layer_norm_linear``: a ``ColumnParallelLinear`` whose fused norm is its own
  ``layer_norm_weight`` (and ``layer_norm_bias`` for LayerNorm), replicated across TP, like
  ``TELayerNormColumnParallelLinear``;
- ``layer_norm`` and the block's final norm (``TENorm``): the torch norm, plus the (empty)
  ``_extra_state`` transformer-engine 2's norms (fusible ops) save;
- ``column/row_parallel_linear`` and ``core_attention``: the local ones (MLA layers get
  ``distconv.megatron_model``'s MLA core attention from ``build_gpt``);
- ``linear`` (``TELinear``, which MLA builds with ``parallel_mode="duplicated"`` for its down
  projections): a plain linear whose weight and ``_extra_state`` are replicated across TP, as
  ``TELinear.sharded_state_dict`` saves them; ``multi_latent_attention.TELinear`` is pointed at it
  so that MLA passes it TE's arguments;
- experts: ``SequentialMLP`` of local linears, also for grouped GEMM, whose ``TEGroupedMLP``
  saves what ``SequentialMLP`` saves (megatron-core's docstring); the legacy ``GroupedMLP`` as TE's
  provider picks it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from distconv.megatron_model import stand_ins


class _ExtraState:
    """The (empty) extra state transformer-engine's norms save; what is loaded is ignored."""

    def get_extra_state(self) -> None:
        return None

    def set_extra_state(self, state: Any) -> None:
        """Ignored, as for megatron-core's local linears."""


class _RMSNorm(_ExtraState, torch.nn.RMSNorm):
    pass


class _LayerNorm(_ExtraState, torch.nn.LayerNorm):
    pass


class TENorm:
    """``TENorm``'s stand-in: a torch norm with transformer-engine's names (``weight``, ``bias``)."""

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma:
            raise NotImplementedError("zero-centered gamma: no stand-in")
        norm = _LayerNorm if config.normalization == "LayerNorm" else _RMSNorm
        return norm(hidden_size, eps=eps)


def _layer_norm_column_parallel_linear() -> type:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    class LayerNormColumnParallelLinear(ColumnParallelLinear):
        """``TELayerNormColumnParallelLinear``'s stand-in: the norm before the linear, its parameters
        the linear's own ``layer_norm_weight`` / ``layer_norm_bias``, replicated across TP (not in
        ``ColumnParallelLinear.sharded_state_dict``'s TP axis map)."""

        def __init__(self, input_size: int, output_size: int, *, config: Any, init_method: Any, gather_output: bool,
                     bias: bool, skip_bias_add: bool, is_expert: bool, skip_weight_param_allocation: bool = False,
                     tp_comm_buffer_name: str | None = None, tp_group: Any = None, stride: int = 1) -> None:
            super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                             gather_output=gather_output, stride=stride, skip_bias_add=skip_bias_add,
                             skip_weight_param_allocation=skip_weight_param_allocation, is_expert=is_expert,
                             tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group)
            if config.layernorm_zero_centered_gamma:
                raise NotImplementedError("zero-centered gamma: no stand-in")
            self.normalization, self.eps = config.normalization, config.layernorm_epsilon
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
            if self.normalization == "LayerNorm":
                self.layer_norm_bias = torch.nn.Parameter(torch.zeros(input_size, dtype=config.params_dtype))

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
            if self.normalization == "LayerNorm":
                x = F.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias, self.eps)
            else:
                x = F.rms_norm(x, x.shape[-1:], self.layer_norm_weight, self.eps)
            return super().forward(x, *args, **kwargs)

    return LayerNormColumnParallelLinear


class TELinear(_ExtraState, torch.nn.Module):
    """``TELinear``'s stand-in for ``parallel_mode="duplicated"`` (MLA's down projections): the
    whole ``weight`` on every TP rank, no bias; returns ``(output, None)`` like megatron's linears."""

    def __init__(self, input_size: int, output_size: int, *, parallel_mode: str | None, config: Any, init_method: Any,
                 bias: bool, skip_bias_add: bool, skip_weight_param_allocation: bool,
                 tp_comm_buffer_name: str | None = None, is_expert: bool = False, symmetric_ar_type: Any = None,
                 tp_group: Any = None) -> None:
        super().__init__()
        if parallel_mode != "duplicated" or bias or is_expert or skip_weight_param_allocation:
            raise NotImplementedError("TELinear stand-in: duplicated, bias-free, non-expert only")
        from megatron.core.utils import get_tensor_model_parallel_group_if_none

        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        if config.perform_initialization:
            init_method(self.weight)
        self._tp_group = get_tensor_model_parallel_group_if_none(tp_group)  # as TELinear: for the replica ids

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.linear(x, self.weight), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """Replicated across TP and DP, as ``TELinear.sharded_state_dict`` (the main replica: TP and DP rank 0)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, None, sharded_offsets, tp_group=self._tp_group,
                                                   dp_cp_group=metadata["dp_cp_group"])


def _spec_provider() -> type:
    from megatron.core.models.backends import BackendSpecProvider
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP

    fused = _layer_norm_column_parallel_linear()

    class TESpecProvider(BackendSpecProvider):
        """``TESpecProvider``'s stand-in: local modules saved as TE's are."""

        def linear(self) -> type:
            return TELinear

        def column_parallel_linear(self) -> type:
            return ColumnParallelLinear

        def row_parallel_linear(self) -> type:
            return RowParallelLinear

        def fuse_layernorm_and_linear(self) -> bool:
            return True

        def column_parallel_layer_norm_linear(self) -> type:
            return fused

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
            return TENorm

        def core_attention(self) -> type:
            return DotProductAttention

        def grouped_mlp_modules(self, moe_use_grouped_gemm: bool,
                                moe_use_legacy_grouped_gemm: bool) -> tuple[type, MLPSubmodules | None]:
            if moe_use_grouped_gemm and moe_use_legacy_grouped_gemm:
                return GroupedMLP, None
            return SequentialMLP, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)

        def activation_func(self) -> None:
            return None

    return TESpecProvider


@contextlib.contextmanager
def te_spec_stand_in() -> Iterator[None]:
    """While active, megatron-core's TE spec builders pick the stand-ins; undone on exit."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import multi_latent_attention

    with stand_ins([(gpt_layer_specs, "TESpecProvider", _spec_provider()), (gpt_layer_specs, "TENorm", TENorm),
                    (multi_latent_attention, "TELinear", TELinear)]):
        yield
