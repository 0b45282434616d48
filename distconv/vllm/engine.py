"""vLLM's worker side of ``distconv_gloo`` (imported inside vLLM's processes only).

Each ``update_weights`` names a layer group (names, dtypes, shapes); the worker receives the
tensors from the trainer over gloo and loads them with the model's own ``load_weights`` under
vLLM's layerwise reload: ``start_weight_update`` moves the layers to the meta device, a layer is
rebuilt once all its tensors arrived, and ``finish_weight_update`` restores any layer that got
nothing. Between the two the engine must not serve: a layer still waiting is on the meta device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from distconv.vllm.link import DTYPES, broadcast, gloo_group


@dataclasses.dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    world_size: int  # the trainer's sender and every vLLM worker
    rank_offset: int = 1  # this engine's first worker's rank in the group
    timeout_s: float = 600.0


@dataclasses.dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


class GlooEngine(WeightTransferEngine):
    """Receives weight updates over gloo from ``distconv.vllm.sender.GlooSender``."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._group = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        self._group = gloo_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                                 init_info.timeout_s)

    def start_weight_update(self) -> None:
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class ends with torch.accelerator.synchronize(), which fails where there is none
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        names, dtypes, shapes = update_info.names, update_info.dtype_names, update_info.shapes
        if self._group is None:
            raise RuntimeError("distconv_gloo: init_weight_transfer_engine was not called")
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(f"distconv_gloo: {len(names)} names, {len(dtypes)} dtypes and {len(shapes)} shapes")
        bad = [d for d in dtypes if d not in DTYPES]
        if bad:
            raise ValueError(f"distconv_gloo: dtype {bad[0]!r} is not one of {', '.join(DTYPES)}")
        batch = [(n, torch.empty([int(s) for s in shape], dtype=DTYPES[d])) for n, d, shape in zip(names, dtypes, shapes)]
        for _, tensor in batch:
            broadcast(self._group, tensor)
        self.model.load_weights(batch)

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        self._group = None
