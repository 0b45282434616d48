"""The read-ahead and the transfers' bookkeeping, on a real checkpoint's plan.

The reader stands in for megatron-core's load (a collective) with one that records which
slices were asked for, when, and hands back tensors of the planned shape: what is checked is
when the read-ahead starts a load, not what a load returns.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from distconv.directions.export import make_plan
from distconv.engine.comm import Comm, HostBuffers
from distconv.engine.marker import HashedWrites
from distconv.engine.plan import Plan, Read
from distconv.engine.stream import ReadAhead, Stream, WriterThread
from distconv.errors import DistconvError
from distconv.families import FAMILIES, pick_family
from distconv.megatron.args import spec_from_args
from distconv.megatron.source import describe

from fixtures.build import layout_dir

WINDOW = 20_000  # bytes per read batch: several batches


class _Recording:
    """Records each ``read`` call; returns zeros of the planned shapes, in ``dtype`` if given."""

    def __init__(self, dtype: torch.dtype | None = None, collective: bool = True) -> None:
        self.calls: list[list[str]] = []
        self.dtype, self.collective = dtype, collective

    def read(self, reads: list[Read], dtype: torch.dtype) -> list[torch.Tensor]:
        self.calls.append([r.key for r in reads])
        return [torch.zeros(r.sizes, dtype=self.dtype or dtype) for r in reads]

    def files(self, reads: list[Read]) -> list[str]:
        return []


def _plan(built) -> Plan:
    ckpt = describe(layout_dir(built, "llama", 2, 1))
    spec = spec_from_args(ckpt.args).with_vocab(250)
    plan = make_plan(ckpt, spec, pick_family(FAMILIES, spec, None), torch.float32, 1, max_shard_size=5 * 10**9, window=WINDOW)
    assert len(plan.batches(WINDOW)) >= 4
    return plan


def _alone() -> Comm:
    """Rank 0 of a world of one (its agreement and gather need no process group)."""
    return Comm(0, 1, torch.device("cpu"), False, None, None)


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "distconv-reader"]


def test_a_collective_batch_is_read_only_once_permitted():
    """Each rank reads a batch once every rank agreed on the one before (``permit``); a permitted
    batch is read even after ``close``, as its peers read it too."""
    calls: list[int] = []
    ahead = ReadAhead([10, 10, 10], lambda k: calls.append(k) or k, limit=100, collective=True)
    ahead.permit(1)
    assert ahead.take(0) == (0, None)
    time.sleep(0.3)
    assert calls == [0], "batch 1 was read before it was permitted"
    ahead.permit(2)
    ahead.close()
    assert calls == [0, 1] and not _reader_threads(), "close() must read the permitted batch and join the thread"


def test_walking_a_unit_permits_the_next_batch(built):
    """On a real plan: walking the first unit (every rank agreed on it) starts the next batch's load."""
    plan = _plan(built)
    reader = _Recording()
    stream = Stream(plan, reader, _alone(), WINDOW)
    index, parts = next(stream.walk())
    assert index == 0 and [tuple(p.shape) for p in parts] == [part.shape for part in plan.units[0].parts]
    stream.close()
    assert len(reader.calls) == 2, f"{len(reader.calls)} loads started"
    assert not _reader_threads(), "close() must join the reader thread"


def test_a_local_read_ahead_holds_at_most_its_window_and_reads_a_miss_next():
    """Local reads: as many batches ahead as ``limit`` bytes hold; one asked for before its turn is
    read next and counted."""
    calls: list[int] = []
    ahead = ReadAhead([40, 40, 40, 40], lambda k: calls.append(k) or k, limit=100, collective=False)
    time.sleep(0.3)
    assert calls == [0, 1], "two batches of 40 fit 100 bytes, a third does not"
    assert ahead.take(3) == (3, None) and ahead.misses == 1 and calls == [0, 1, 3]
    assert ahead.take(0) == (0, None) and ahead.take(1) == (1, None) and ahead.take(2) == (2, None)
    ahead.close()
    assert calls == [0, 1, 3, 2] and not _reader_threads()


def test_slices_unlike_the_plan_are_an_error_before_any_transfer(built):
    plan = _plan(built)
    stream = Stream(plan, _Recording(torch.float16), _alone(), WINDOW)
    with pytest.raises(DistconvError) as error:
        next(stream.walk())
    stream.close()
    assert "loaded as torch.float16" in str(error.value) and "planned torch.float32" in str(error.value)


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


def test_a_stuck_writer_thread_is_an_error_within_its_bound():
    """A job that never ends (a hung fsync): ``put`` stops waiting for room, ``join`` for the end,
    each after ``stall_s`` without progress; a slow job that ends in time is no error."""
    release = threading.Event()
    done = []
    writer = WriterThread(lambda index, tensors: (release.wait() if index == 0 else time.sleep(0.3), done.append(index)),
                          stall_s=0.5)
    start = time.monotonic()
    for index in range(4):  # job 0 hangs, 1 and 2 fill the queue, 3 finds no room
        writer.put(index, [])
    assert "made no progress for 0.5 s" in str(writer.error)
    assert writer.join() is writer.error and writer.alive  # no second wait once stuck
    assert time.monotonic() - start < 3
    release.set()

    ended: list = []
    slow = WriterThread(lambda index, tensors: (time.sleep(0.3), ended.append(index)), stall_s=0.5)
    for index in range(4):
        slow.put(index, [])
    assert slow.join(last=lambda: ended.append("last")) is None and not slow.alive
    assert ended == [0, 1, 2, 3, "last"]


def test_hashed_writes_hash_every_byte_large_and_small(tmp_path):
    """A buffer over ``OVERLAP_FROM`` is hashed on the other thread while it is written, a small one
    in the writing thread; the sum is the file's either way."""
    import hashlib
    import os

    writes = HashedWrites()
    sha = hashlib.sha256()
    parts = [b"header", os.urandom(3 << 20), memoryview(os.urandom(5000)), bytearray(os.urandom(HashedWrites.OVERLAP_FROM))]
    with open(tmp_path / "f", "wb") as f:
        for data in parts:
            writes.write(f, sha, data)
    writes.close()
    assert sha.hexdigest() == hashlib.sha256((tmp_path / "f").read_bytes()).hexdigest()


@pytest.mark.parametrize("collective", [True, False])
def test_the_walk_agrees_once_per_collective_batch_and_never_per_unit(built, collective):
    """No lockstep: the ranks agree only before a collective reader's next load (once per batch of
    ``window`` bytes), never per unit, and never with a local reader (a failure there reaches every
    rank through the job's store, ``Comm.fail``)."""
    plan = _plan(built)
    comm = _alone()
    agreed: list = []
    comm.agree = agreed.append  # counts the agreements (this instance only)
    window = 8 * WINDOW  # several units per load
    stream = Stream(plan, _Recording(collective=collective), comm, window)
    walked = [index for index, _ in stream.walk()]
    stream.close()
    assert walked == list(range(len(plan.units)))
    assert len(agreed) == (len(plan.batches(window)) if collective else 0) and not any(agreed)
    assert len(plan.units) > 2 * len(plan.batches(window))  # far more units than agreements
