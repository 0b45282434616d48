"""The trainer's side of ``distconv_gloo``: a source's groups, sent into a running vLLM.

Every rank of the job makes a ``GlooSender`` and calls ``send`` together (the source's pass is a
collective). The ranks yielding any of the source's tensors (rank 0, or with
``distconv.weights(..., senders="holders")`` each PP stage and EP rank) join one gloo group with
vLLM's workers; the lowest of them drives vLLM through ``client`` (anything with vLLM's
``VLLMWeightSyncClient`` methods: ``init_weight_transfer_engine``, ``start_weight_update``,
``update_weights``, ``finish_weight_update``; e.g. vLLM's ``HTTPVLLMWeightSyncClient``). Per layer
group it asks vLLM to take the whole group, naming the sender of each tensor, while each sender
sends its own tensors of the group, in the group's order, to every worker. A failure anywhere
(the model, the transfer, vLLM refusing a group) raises on every rank, and
``finish_weight_update`` is then not called: vLLM keeps its update session open and must not serve
until a complete update is finished.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from distconv.vllm.link import gloo_group


class Client(Protocol):
    """vLLM's ``VLLMWeightSyncClient``: the four calls of a weight update."""

    def init_weight_transfer_engine(self, init_info: dict) -> Any: ...
    def start_weight_update(self) -> Any: ...
    def update_weights(self, update_info: dict) -> Any: ...
    def finish_weight_update(self, weight_version: str | None = None) -> Any: ...


class Source(Protocol):
    """What ``send`` needs of ``distconv.weights``."""

    def metadata(self) -> list[Any]: ...
    def holders(self) -> list[list[int]]: ...
    def deliver(self, send: Callable[[list[str], list[torch.Tensor | None]], None]) -> int: ...
    def agree(self, error: BaseException | None) -> None: ...


@dataclasses.dataclass(frozen=True)
class Link:
    """Where the gloo group meets: the sender serves its store at ``host:port``; ``workers`` is
    the number of vLLM workers (TP x PP x DP of the engine)."""

    host: str
    port: int
    workers: int = 1
    timeout_s: float = 600.0


def _senders(source: Source) -> list[int]:
    """The ranks yielding any of the source's tensors, in order."""
    return sorted({rank for holders in source.holders() for rank in holders})


class GlooSender:
    """Collective: built on every rank of the job; the ranks yielding any of the source's tensors
    join the gloo group, and the lowest of them (given ``client``) talks to vLLM."""

    def __init__(self, source: Source, client: Client | None, link: Link) -> None:
        self.source, self.client, self.link = source, client, link
        self.senders = _senders(source)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.driver = self.rank == self.senders[0]
        self._group = None
        error = None
        if self.rank in self.senders:
            try:
                if self.driver and client is None:
                    raise ValueError(f"rank {self.rank}, the first holding weights, needs a client of the vLLM engine")
                world = len(self.senders) + link.workers
                init = {"master_address": link.host, "master_port": link.port, "world_size": world,
                        "rank_offset": len(self.senders), "timeout_s": link.timeout_s}
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    rpc = pool.submit(client.init_weight_transfer_engine, init) if self.driver else None
                    self._group = gloo_group(link.host, link.port, self.senders.index(self.rank), world, link.timeout_s)
                    if rpc is not None:
                        rpc.result()
            except Exception as e:
                error = e
        source.agree(error)

    def _send_group(self, names: list[str], tensors: list[torch.Tensor | None], holders: list[int],
                    meta: dict[str, Any]) -> None:
        """The driver asks vLLM to take the group, naming each tensor's sender, while each sender
        sends its own tensors to every worker in the group's order (the order a worker receives
        them in, each from its sender: gloo keeps each pair's messages in order)."""
        mine = [t for t, holder in zip(tensors, holders, strict=True) if holder == self.rank]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            rpc = None
            if self.driver:
                info = {"names": names, "dtype_names": [str(meta[n].dtype).removeprefix("torch.") for n in names],
                        "shapes": [list(meta[n].shape) for n in names],
                        "srcs": [self.senders.index(holder) for holder in holders]}
                rpc = pool.submit(self.client.update_weights, info)
            workers = range(len(self.senders), len(self.senders) + self.link.workers)
            for tensor in mine:
                for work in [self._group.send([tensor], worker, 0) for worker in workers]:
                    work.wait()
            if rpc is not None:
                rpc.result()

    def _on_driver(self, call: Callable[[], Any], source: Source) -> None:
        error = None
        try:
            if _senders(source) != self.senders:
                raise ValueError("the source's tensors are yielded by other ranks than this link's senders")
            if self.driver:
                call()
        except Exception as e:
            error = e
        source.agree(error)

    def send(self, weight_version: str | None = None, source: Source | None = None) -> dict[str, Any]:
        """Collective: one weight update, ``start`` .. one ``update_weights`` per group .. ``finish``,
        from the link's source or ``source`` (another source of the same job held by the same
        ranks: e.g. the model after a change of layout). Returns the seconds it took and the groups
        sent (the same on every rank)."""
        start = time.perf_counter()
        source = source or self.source
        self._on_driver(lambda: self.client.start_weight_update(), source)
        holders = iter(source.holders())
        meta = {m.name: m for m in source.metadata()}
        groups = source.deliver(lambda names, tensors: self._send_group(names, tensors, next(holders), meta))
        self._on_driver(lambda: self.client.finish_weight_update(weight_version), source)
        return {"seconds": time.perf_counter() - start, "groups": groups}

    def close(self) -> None:
        self._group = None
