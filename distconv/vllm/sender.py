"""The trainer's side of ``distconv_gloo``: a source's groups, sent into a running vLLM.

Every rank of the job makes a ``GlooSender`` and calls ``send`` together (the source's pass is a
collective); the rank holding the tensors (rank 0) drives vLLM through ``client`` (anything with
vLLM's ``VLLMWeightSyncClient`` methods: ``init_weight_transfer_engine``,
``start_weight_update``, ``update_weights``, ``finish_weight_update``; e.g. vLLM's
``HTTPVLLMWeightSyncClient``) and broadcasts each group while vLLM's workers receive it. A
failure anywhere (the model, the transfer, vLLM refusing a group) raises on every rank, and
``finish_weight_update`` is then not called: vLLM keeps its update session open and must not
serve until a complete update is finished.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Protocol

import torch

from distconv.vllm.link import broadcast, gloo_group


class Client(Protocol):
    """vLLM's ``VLLMWeightSyncClient``: the four calls of a weight update."""

    def init_weight_transfer_engine(self, init_info: dict) -> Any: ...
    def start_weight_update(self) -> Any: ...
    def update_weights(self, update_info: dict) -> Any: ...
    def finish_weight_update(self, weight_version: str | None = None) -> Any: ...


class Source(Protocol):
    """What ``send`` needs of ``distconv.weights``."""

    def held_names(self) -> Any: ...
    def deliver(self, send: Callable[[list[str], list[torch.Tensor]], None]) -> int: ...
    def agree(self, error: BaseException | None) -> None: ...


@dataclasses.dataclass(frozen=True)
class Link:
    """Where the gloo group meets: the sender serves its store at ``host:port``; ``workers`` is
    the number of vLLM workers (TP x PP x DP of the engine)."""

    host: str
    port: int
    workers: int = 1
    timeout_s: float = 600.0


class GlooSender:
    """Collective: built on every rank of the job; only the rank holding the source's tensors
    opens the group and talks to vLLM."""

    def __init__(self, source: Source, client: Client | None, link: Link) -> None:
        self.source, self.client, self.link = source, client, link
        self.sender = bool(source.held_names())
        self._group = None
        error = None
        if self.sender:
            try:
                if client is None:
                    raise ValueError("the rank holding the weights needs a client of the vLLM engine")
                init = {"master_address": link.host, "master_port": link.port, "world_size": link.workers + 1,
                        "rank_offset": 1, "timeout_s": link.timeout_s}
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    rpc = pool.submit(client.init_weight_transfer_engine, init)
                    self._group = gloo_group(link.host, link.port, 0, link.workers + 1, link.timeout_s)
                    rpc.result()
            except Exception as e:
                error = e
        source.agree(error)

    def _send_group(self, names: list[str], tensors: list[torch.Tensor]) -> None:
        info = {"names": names, "dtype_names": [str(t.dtype).removeprefix("torch.") for t in tensors],
                "shapes": [list(t.shape) for t in tensors]}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            rpc = pool.submit(self.client.update_weights, info)
            for tensor in tensors:
                broadcast(self._group, tensor)
            rpc.result()

    def _on_sender(self, call: Callable[[], Any], source: Source) -> None:
        error = None
        try:
            if bool(source.held_names()) != self.sender:
                raise ValueError("the source's tensors are held by another rank than this link's sender")
            if self.sender:
                call()
        except Exception as e:
            error = e
        source.agree(error)

    def send(self, weight_version: str | None = None, source: Source | None = None) -> dict[str, Any]:
        """Collective: one weight update, ``start`` .. one ``update_weights`` per group .. ``finish``,
        from the sender's source or ``source`` (another source of the same job, also held by this
        link's sender: e.g. the model after a change of layout). Returns the seconds it took and the
        groups sent (the same on every rank)."""
        start = time.perf_counter()
        source = source or self.source
        self._on_sender(self.client.start_weight_update if self.sender else lambda: None, source)
        groups = source.deliver(self._send_group)
        self._on_sender(lambda: self.client.finish_weight_update(weight_version), source)
        return {"seconds": time.perf_counter() - start, "groups": groups}

    def close(self) -> None:
        self._group = None
