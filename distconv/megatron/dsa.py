"""megatron-core 0.16's DeepSeek sparse attention models (DeepSeek-V3.2, GLM-5) built and run on a CPU
without transformer-engine or ``fast_hadamard_transform``: what ``distconv.megatron.model`` changes
while it does so.

megatron-core 0.16 builds the DSA attention only from a backend with a ``linear()`` module
(``get_dsa_module_spec_for_backend``; nothing in it picks this spec for a model: Megatron-Bridge and
custom ``--spec``s do), i.e. transformer-engine's. Stood in for, only while a model is built
(``model.build_gpt``), and put back after: ``TESpecProvider``, ``TENorm`` (``gated_delta_net``'s
norms and fused norm-linear, with transformer-engine's names and sharding) and ``TELinear``
(``DuplicatedLinear``: MLA's down projections and the indexer's linears, whole on every TP rank).

The indexer's one CUDA-only call, ``dsa.rotate_activation`` (``fast_hadamard_transform``, bf16
only), is replaced while a model runs (``model.forward_logits``) by the same Hadamard transform in
torch (``hadamard``). It is orthogonal, so it changes no dot product: transformers leaves it out.
Everything else in the forward pass is megatron-core's code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distconv.megatron import gated_delta_net

Change = tuple[Any, str, Any]


class DuplicatedLinear(gated_delta_net._EmptyExtraState, torch.nn.Module):
    """``TELinear``'s stand-in for ``parallel_mode="duplicated"``: the whole bias-free ``weight`` on every
    TP rank, returning ``(output, None)``; saved replicated with an (empty) ``_extra_state``, as
    ``TELinear.sharded_state_dict`` saves it."""

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
        self._tp_group = get_tensor_model_parallel_group_if_none(tp_group)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.linear(x, self.weight), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, None, sharded_offsets, tp_group=self._tp_group,
                                                   dp_cp_group=(metadata or {}).get("dp_cp_group"))


def spec_provider() -> type:
    """``gated_delta_net.spec_provider`` with ``linear()``: ``DuplicatedLinear``."""

    class Provider(gated_delta_net.spec_provider()):
        def linear(self) -> type:
            return DuplicatedLinear

    return Provider


def spec_changes() -> list[Change]:
    """While the model is built: transformer-engine's provider, norm and ``TELinear`` are the stand-ins."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import multi_latent_attention

    return [(gpt_layer_specs, "TESpecProvider", spec_provider()), (gpt_layer_specs, "TENorm", gated_delta_net.Norm),
            (multi_latent_attention, "TELinear", DuplicatedLinear)]


def layer_specs(config: Any, normalization: str) -> Any:
    """megatron-core's transformer-engine decoder block spec with its DSA attention in every layer."""
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import get_dsa_module_spec_for_backend
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization=normalization)
    attention = get_dsa_module_spec_for_backend(config, backend=spec_provider()())
    for layer in block.layer_specs:
        layer.submodules.self_attention = attention
    return block


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``rotate_activation`` in torch: ``x @ H_n^T / sqrt(n)`` over the last dim, ``H_n`` Sylvester's
    Hadamard matrix (n a power of 2, as ``fast_hadamard_transform`` computes it), in float64."""
    n = x.size(-1)
    if n & (n - 1):
        raise ValueError(f"Hadamard transform of size {n}: not a power of 2")
    h = torch.ones(1, 1, dtype=torch.float64, device=x.device)
    while h.size(0) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return ((x.double() @ h.T) * n ** -0.5).to(x.dtype)


def kernel_changes() -> list[Change]:
    """While a DSA model runs: ``rotate_activation`` is ``hadamard`` wherever megatron-core's kernel
    cannot run (no ``fast_hadamard_transform``, a CPU tensor, or not bf16)."""
    from megatron.core.transformer.experimental_attention_variant import dsa

    kernel = dsa.rotate_activation

    def rotate(x: torch.Tensor) -> torch.Tensor:
        usable = dsa.hadamard_transform is not None and x.is_cuda and x.dtype == torch.bfloat16
        return kernel(x) if usable else hadamard(x)

    return [(dsa, "rotate_activation", rotate)]
