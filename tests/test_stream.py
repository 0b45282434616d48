"""The reader thread and the transfers' bookkeeping, on a real checkpoint's plan.

The reader stands in for megatron-core's load (a collective) with one that records which
slices were asked for, when, and hands back tensors of the planned shape: what is checked is
when the ``Prefetcher`` starts a load, not what a load returns.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from distconv.directions.export import make_plan
from distconv.engine.comm import Comm, HostBuffers
from distconv.engine.plan import Plan, Read
from distconv.engine.stream import Prefetcher
from distconv.errors import DistconvError
from distconv.families import FAMILIES, pick_family
from distconv.megatron.args import spec_from_args
from distconv.megatron.source import describe

from fixtures.build import layout_dir

WINDOW = 20_000  # bytes per read batch: several batches


class _Recording:
    """Records each ``read`` call; returns zeros of the planned shapes, in ``dtype`` if given."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.calls: list[list[str]] = []
        self.dtype = dtype

    def read(self, reads: list[Read], dtype: torch.dtype) -> list[torch.Tensor]:
        self.calls.append([r.key for r in reads])
        return [torch.zeros(r.sizes, dtype=self.dtype or dtype) for r in reads]


def _plan(built) -> Plan:
    ckpt = describe(layout_dir(built, "llama", 2, 1))
    spec = spec_from_args(ckpt.args).with_vocab(250)
    plan = make_plan(ckpt, spec, pick_family(FAMILIES, spec, None), torch.float32, 2, max_shard_size=5 * 10**9, window=WINDOW)
    assert len(plan.batches(WINDOW)) >= 4
    return plan


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "distconv-reader"]


def test_a_batch_is_read_only_once_every_rank_agreed_on_the_one_before(built):
    plan = _plan(built)
    first = plan.batches(WINDOW)[0]
    for agreed, loads in ((False, 1), (True, 2)):
        reader = _Recording()
        prefetch = Prefetcher(reader, plan, 0, WINDOW)
        groups = iter(prefetch)
        tensors, error = next(groups)
        assert error is None and len(tensors) == len(plan.groups[0].reads_of(0))
        if agreed:  # the next batch may start; close() then waits for it, as the peers read it too
            prefetch.agreed(first[0])
        prefetch.close()
        assert len(reader.calls) == loads, f"agreed={agreed}: {len(reader.calls)} loads started"
        assert not _reader_threads(), "close() must join the reader thread"


def test_slices_unlike_the_plan_are_an_error_before_any_transfer(built):
    plan = _plan(built)
    prefetch = Prefetcher(_Recording(torch.float16), plan, 0, WINDOW)
    tensors, error = next(iter(prefetch))
    prefetch.close()
    assert tensors is None and isinstance(error, DistconvError)
    assert "loaded as torch.float16" in str(error) and "planned torch.float32" in str(error)


def test_host_buffers_are_reused_per_source_and_grow():
    buffers = HostBuffers(pin=False)
    a = buffers.copy(1, torch.arange(100, dtype=torch.uint8))
    b = buffers.take(1, 60)
    assert b.data_ptr() == a.data_ptr() and b.numel() == 60  # reused, not allocated again
    assert buffers.take(2, 60).data_ptr() != a.data_ptr()  # each source its own
    c = buffers.copy(1, torch.arange(200, dtype=torch.uint8))
    assert c.numel() == 200 and torch.equal(c, torch.arange(200, dtype=torch.uint8))
    assert buffers.take(1, 100).data_ptr() == c.data_ptr()  # the grown one is kept


class _Stalled:
    """A transfer that never completes, as a dead peer leaves an NCCL one (the CPU is not blocked)."""

    def is_completed(self) -> bool:
        return False

    def wait(self) -> None:
        raise AssertionError("waited on a transfer that cannot finish")


def test_a_stalled_gpu_transfer_is_one_error_at_the_timeout():
    comm = Comm(0, 2, torch.device("cuda", 0), False, None, None, timeout_s=0.2)
    start = time.monotonic()
    with pytest.raises(DistconvError, match=r"did not finish within 0.2 s \(--timeout\): a peer rank died"):
        comm.wait([_Stalled()])
    assert time.monotonic() - start < 5
