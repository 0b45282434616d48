"""The one data path: a plan's units streamed from a source to their writers.

One read-ahead thread per rank reads the units' boxes in plan order, holding at most
``--window`` bytes read and not yet taken. It reads in one of two modes, which the source's
reader decides:

- **collective**: megatron-core's ``load`` is a collective on the default process group, so
  every rank loads the same batches of units (one call per batch of at most ``--window`` bytes)
  and a batch starts only once the consumer permits it, which it does when every rank has agreed
  on the batch before it: none is left inside a collective its peers will not join;
- **local**: each rank reads alone, a unit at a time, as room allows.

Two ways to consume them:

- ``walk`` (export): every rank goes through every unit in plan order; the ranks agree after each
  unit's reads (one message if any failed), and its parts are gathered on its writer (NCCL on
  GPUs, else gloo; no transfer when its reads all lie there), where the sink maps and writes them
  behind, in a ``WriterThread``;
- ``take`` (import, reshard): the writer's sink asks for one of its own units when it reaches it
  (megatron-core's save, from inside DCP's planner); its reads all lie on the writer, so no
  collective is involved, and a unit asked for before its turn is read next (``misses``).

The threads are joined before the run returns, on success and on error.
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import threading
import time
from typing import Any, Callable, Iterator, Protocol

import torch

from distconv.engine.comm import Comm, check_slices, place
from distconv.engine.plan import Plan, Read, Unit
from distconv.errors import DistconvError


class Reader(Protocol):
    """Reads planned boxes of a source, as CPU tensors of the planned dtype."""

    collective: bool  # every rank must read each batch together (megatron-core's load)

    def read(self, reads: list[Read], dtype: torch.dtype) -> list[torch.Tensor]: ...
    def files(self, reads: list[Read]) -> list[str]:
        """The source's files ``reads`` touch (for ``--dry-run``)."""


_Result = tuple[Any, BaseException | None]


class ReadAhead:
    """Batches read by one background thread in order, holding at most ``limit`` bytes read and not
    yet taken (one batch more when it alone is larger).

    ``collective``: a batch is read only once ``permit`` allows it, and a permitted batch is read
    even after ``close`` (its peers read it too); after a failed read nothing more is read.
    Otherwise a batch asked for before its turn is read next (counted in ``misses``).
    ``threaded=False`` reads each batch only when it is taken, in the taking thread.
    """

    def __init__(self, sizes: list[int], read: Callable[[int], Any], limit: int, collective: bool,
                 threaded: bool = True) -> None:
        self._sizes, self._read, self._limit, self._collective = sizes, read, limit, collective
        self._order = list(range(len(sizes)))
        self._done: dict[int, _Result] = {}
        self._started: set[int] = set()
        self._urgent: int | None = None
        self._permitted = 0 if collective else len(sizes)  # batches 0 .. permitted-1 may be read
        self._held = 0
        self._stopped = False
        self.misses = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="distconv-reader", daemon=True)
            self._thread.start()

    def _next(self) -> int | None:
        """Under the lock: the batch to read now, or None to wait."""
        if self._urgent is not None and self._urgent not in self._started:
            return self._urgent
        while self._order and self._order[0] in self._started:
            self._order.pop(0)
        if not self._order or self._order[0] >= self._permitted:
            return None
        k = self._order[0]
        # once stopped, a collective reader still reads what is permitted, room or not
        return k if self._stopped or self._held == 0 or self._held + self._sizes[k] <= self._limit else None

    def _run(self) -> None:
        while True:
            with self._cond:
                while (k := self._next()) is None or self._stopped:
                    if self._stopped and (k is None or not self._collective):
                        return
                    if k is not None:  # stopped, yet permitted: its peers start this load too
                        break
                    if not self._order and self._urgent is None:
                        return
                    self._cond.wait()
                self._started.add(k)
            result = self._attempt(k)
            with self._cond:
                self._done[k] = result
                self._held += self._sizes[k]
                self._cond.notify_all()
            if result[1] is not None and self._collective:
                return

    def _attempt(self, k: int) -> _Result:
        try:
            return self._read(k), None
        except BaseException as e:  # handed to the consumer (which makes every rank agree on it)
            return None, e

    def permit(self, batches: int) -> None:
        """Batches ``0 .. batches-1`` may be read (collective mode)."""
        with self._cond:
            self._permitted = max(self._permitted, batches)
            self._cond.notify_all()

    def take(self, k: int) -> _Result:
        """Batch ``k``'s data and error (one of them None); a batch is taken once."""
        with self._cond:
            if self._permitted <= k:
                raise RuntimeError(f"internal: batch {k} taken before every rank agreed on the one before")
        if self._thread is None:
            return self._attempt(k)
        with self._cond:
            if k not in self._started and not self._collective:
                self.misses += 1
                self._urgent = k
                self._cond.notify_all()
            while k not in self._done:
                if not self._thread.is_alive():
                    raise RuntimeError(f"internal: the read-ahead thread ended without reading batch {k}")
                self._cond.wait(timeout=1.0)
            result = self._done.pop(k)
            self._held -= self._sizes[k]
            if self._urgent == k:
                self._urgent = None
            self._cond.notify_all()
        return result

    def close(self) -> None:
        """Start no further batch (but a permitted one, collectively) and join the thread. A load
        in flight is one every rank started; it ends, or fails within the group's timeout when a
        peer died."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._done.clear()


def _walked(plan: Plan, reader: Reader, rank: int, batches: list[list[int]], k: int) -> list[list[torch.Tensor]]:
    """This rank's reads of batch ``k``'s units, in one call: per unit, its tensors."""
    units = [plan.units[i] for i in batches[k]]
    reads = [r for u in units for r in u.reads_of(rank)]
    dtype = plan.dtype_of(units[0])
    tensors = reader.read(reads, dtype)
    check_slices(reads, tensors, dtype)
    per_unit, at = [], 0
    for u in units:
        n = len(u.reads_of(rank))
        per_unit.append(tensors[at : at + n])
        at += n
    return per_unit


def _pulled(plan: Plan, reader: Reader, rank: int, batches: list[list[int]], k: int) -> list[torch.Tensor]:
    """Batch ``k``'s one unit's parts, read and assembled (by its writer: ``rank``)."""
    unit = plan.units[batches[k][0]]
    dtype = plan.dtype_of(unit)
    return assemble(unit, reader.read(unit.reads, dtype), dtype)


def assemble(unit: Unit, data: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """A unit's parts from all its reads' ``data`` (rows no read covers are zeros: padding)."""
    parts: list[torch.Tensor | None] = [None] * len(unit.parts)
    for read, tensor in zip(unit.reads, data):
        place(parts, unit, read, tensor, dtype, fill=True, adopt=True)
    return [p if p is not None else torch.zeros(part.shape, dtype=dtype) for p, part in zip(parts, unit.parts)]


class Stream:
    """A plan's units streamed from ``reader`` through one ``ReadAhead`` of ``window`` bytes.

    ``pull=False``: every rank ``walk``s every unit (a collective reader's units in batches of at
    most ``window`` bytes). ``pull=True``: a writer ``take``s its own units, one at a time, in plan
    order ahead of the asking (a local reader only).
    """

    def __init__(self, plan: Plan, reader: Reader, comm: Comm, window: int, pull: bool = False,
                 threaded: bool = True) -> None:
        if pull and reader.collective:
            raise RuntimeError("internal: a collective reader's units are walked, not pulled")
        self._plan, self._comm, self._collective = plan, comm, reader.collective
        if pull:
            batches = [[i] for i, u in enumerate(plan.units) if u.writer == comm.rank]
        elif reader.collective:
            batches = plan.batches(window)
        else:
            batches = [[i] for i in range(len(plan.units))]
        self._batches = batches
        self._batch_of = {index: k for k, batch in enumerate(batches) for index in batch}
        sizes = [sum(plan.units[i].nbytes for i in batch) for batch in batches]
        # the read functions hold no reference to the stream: no cycle keeps its groups alive
        read = functools.partial(_pulled if pull else _walked, plan, reader, comm.rank, batches)
        self._ahead = ReadAhead(sizes, read, window, reader.collective, threaded)

    def walk(self, check: Callable[[], BaseException | None] = lambda: None, on_device: bool = False
             ) -> Iterator[tuple[int, list[torch.Tensor] | None]]:
        """Collective: ``(unit index, its parts on its writer, None elsewhere)`` for every unit in plan
        order. A failure anywhere (a read, a transfer, ``check()``: the sink's error) is one
        ``DistconvError`` on every rank, raised at once where it happened and by its peers as soon
        as they wait on it (``Comm.fail``). The ranks agree only once per batch of a collective
        reader, before its next load may start; no agreement holds back the units'
        transfers. ``on_device``: ``Comm.gather``'s."""
        self._ahead.permit(1)
        for k, batch in enumerate(self._batches):
            per_unit, error = self._ahead.take(k)
            if self._collective:
                self._comm.agree(error or check())
                self._ahead.permit(k + 2)
            for j, index in enumerate(batch):
                self._comm.check(error or check())
                unit = self._plan.units[index]
                yield index, self._comm.gather(unit, per_unit[j], self._plan.dtype_of(unit), on_device)

    def take(self, index: int) -> list[torch.Tensor]:
        """This writer's unit ``index``'s parts (raising its read's error)."""
        data, error = self._ahead.take(self._batch_of[index])
        if error is not None:
            raise error
        return data

    @property
    def misses(self) -> int:
        """Units taken before the read-ahead reached them."""
        return self._ahead.misses

    def close(self) -> None:
        self._ahead.close()


class WriterThread:
    """Runs ``work(group_index, tensors)`` in order on a background thread; keeps the first error.

    Waits on it are bounded: when no job finishes for ``stall_s`` seconds (a write or an
    ``fsync`` that hangs on the output's storage), ``put`` and ``join`` stop waiting and ``error``
    says so; the thread is then left behind (a daemon), since a system call cannot be interrupted.
    """

    def __init__(self, work: Callable[[int, list[torch.Tensor]], None], stall_s: float = 900.0) -> None:
        self.error: BaseException | None = None
        self.stall_s = stall_s
        self._work = work
        self._drop = False  # set by ``join(discard=True)``: skip the jobs still queued
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._finished = 0  # jobs ended (done, failed or skipped): progress, for the bounded waits
        self._stuck = False  # a wait gave up: later ones do not wait again
        self._thread = threading.Thread(target=self._run, name="distconv-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self.error is None and not self._drop:
                try:
                    job()
                except BaseException as e:
                    self.error = e
            self._finished += 1

    def _stalled(self) -> DistconvError:
        self._stuck = True
        return DistconvError(
            f"writing the output made no progress for {self.stall_s:g} s (half of --timeout): a write or fsync to "
            "the output's storage hangs; stopped")

    def put(self, index: int, tensors: list[torch.Tensor]) -> None:
        """Queue one job; when the queue stays full for ``stall_s``, the job is dropped and ``error`` set."""
        self._enqueue(functools.partial(self._work, index, tensors))

    def _enqueue(self, job: Callable[[], None] | None) -> bool:
        try:
            self._queue.put(job, timeout=self.stall_s)
            return True
        except queue.Full:
            stalled = self._stalled()
            self.error = self.error or stalled
            return False

    @property
    def alive(self) -> bool:
        """The thread has not ended (it may be stuck in a write: leave its files alone)."""
        return self._thread.is_alive()

    def join(self, discard: bool = False, last: Callable[[], None] | None = None) -> BaseException | None:
        """Finish the queued jobs (``discard``: skip them; a job under way still ends), then ``last``
        (e.g. the final flush and ``fsync``) on the thread, and join it; returns the first error.
        Gives up when no job ends for ``stall_s`` seconds."""
        self._drop = self._drop or discard
        if self._thread.is_alive() and not self._stuck and self._enqueue(last) and (last is None or self._enqueue(None)):
            seen, since = self._finished, time.monotonic()
            while self._thread.is_alive():
                self._thread.join(timeout=min(1.0, self.stall_s))
                if self._finished != seen:
                    seen, since = self._finished, time.monotonic()
                elif time.monotonic() - since > self.stall_s:
                    stalled = self._stalled()
                    self.error = self.error or stalled
                    break
        return self.error


def heap_trimmer() -> Callable[[], None]:
    """A function that hands the free space of glibc's heaps back to the system
    (``malloc_trim(0)``); one that does nothing where the C library is not glibc.

    Once glibc has seen a block of a few MB freed, it raises its mmap threshold to that size
    (up to 32 MiB), and from then on chunk-sized tensors come from its heaps, where freed space
    mostly stays resident. Import and reshard allocate and free thousands of chunks, a few at
    a time; measured, a 1-rank import kept 100-290 MB of freed heap resident at its peak, more
    or less from run to run and more for a larger model. Trimming after each chunk keeps the
    peak to what is live (``tests/benchmarks``: the same figure for 0.5 and 2 GB models), for
    about 0.2 s of CPU per GB (the pages handed back are faulted in again when reused).
    """
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return lambda: None
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, ValueError, OSError):  # not glibc, or not a POSIX system
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0) and None
