"""Overlap of the stages: a reader thread runs ahead, a writer thread runs behind.

Per rank: the reader thread loads the next batch of groups (one ``dist_checkpointing.load``
call per batch, a collective on the default process group) while the main thread gathers the
current group (on its own groups), and, on writer ranks, a writer thread maps and writes the
previous one. The reader starts a batch only when the consumer permits it, which it does once
every rank has agreed on the previous batch's first group: so every rank starts the same
loads, and none is left inside a collective that its peers will not join. Both threads are
joined before ``export`` returns, on success and on error.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from typing import Callable, Hashable, Iterator, Protocol

import torch

from distconv.engine.comm import check_slices
from distconv.engine.plan import Plan, Read

_Result = tuple[list[list[torch.Tensor]] | None, BaseException | None]


class Reader(Protocol):
    """Loads planned boxes of a source (megatron-core's collective load, or a rank's own reads)."""

    def read(self, reads: list[Read], dtype: torch.dtype) -> list[torch.Tensor]: ...


class Prefetcher:
    """Reads this rank's slices of every group, in plan order, one permitted batch ahead."""

    def __init__(self, reader: Reader, plan: Plan, rank: int, batch_bytes: int, threaded: bool = True) -> None:
        """``threaded=False`` reads each batch only when the consumer reaches it."""
        self._reader, self._plan, self._rank = reader, plan, rank
        self._batches = plan.batches(batch_bytes)
        self._batch_of_first = {batch[0]: k for k, batch in enumerate(self._batches)}
        self._cond = threading.Condition()
        self._permitted = 0  # batches 0 .. permitted-1 may be read
        self._stopped = False
        self._results: dict[int, _Result] = {}
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._fill, name="distconv-reader", daemon=True)
            self._thread.start()

    def _fill(self) -> None:
        """Read each batch once permitted. A permitted batch is read even after ``close``:
        every rank got the same permissions, so its peers start that load too."""
        for k in range(len(self._batches)):
            with self._cond:
                self._cond.wait_for(lambda: self._permitted > k or self._stopped)
                if self._permitted <= k:
                    return
            result = self._read(k)
            with self._cond:
                self._results[k] = result
                self._cond.notify_all()
            if result[1] is not None:
                return

    def _read(self, k: int) -> _Result:
        batch = self._batches[k]
        reads = [r for g in batch for r in self._plan.groups[g].reads_of(self._rank)]
        try:
            dtype = self._plan.dtype_of(self._plan.groups[batch[0]])
            tensors = self._reader.read(reads, dtype)
            check_slices(reads, tensors, dtype)
        except BaseException as e:  # handed to the consumer, which makes every rank agree
            return None, e
        per_group, at = [], 0
        for g in batch:
            n = len(self._plan.groups[g].reads_of(self._rank))
            per_group.append(tensors[at : at + n])
            at += n
        return per_group, None

    def _take(self, k: int) -> _Result:
        with self._cond:
            if self._permitted <= k:
                raise RuntimeError(f"internal: batch {k} taken before every rank agreed on the one before")
        if self._thread is None:
            return self._read(k)
        with self._cond:
            self._cond.wait_for(lambda: k in self._results)
            return self._results.pop(k)

    def _permit(self, batches: int) -> None:
        with self._cond:
            self._permitted = max(self._permitted, batches)
            self._cond.notify_all()

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor] | None, BaseException | None]]:
        """Yields ``(tensors, error)`` per group in plan order; after an error, only the error.

        Starts the first batch; each later one waits for ``agreed`` on the batch before it.
        """
        self._permit(1)
        for k in range(len(self._batches)):
            per_group, error = self._take(k)
            if error is not None:
                yield None, error
                return
            yield from ((tensors, None) for tensors in per_group)

    def agreed(self, index: int) -> None:
        """Every rank agreed that group ``index`` was read: the batch after its batch may start."""
        k = self._batch_of_first.get(index)
        if k is not None:
            self._permit(k + 2)

    def close(self) -> None:
        """Start no further batch and join the thread. A load in flight is one every rank
        started; it ends, or fails within the group's timeout when a peer died."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._results.clear()


class WriterThread:
    """Runs ``work(group_index, tensors)`` in order on a background thread; keeps the first error."""

    def __init__(self, work: Callable[[int, list[torch.Tensor]], None]) -> None:
        self.error: BaseException | None = None
        self._work = work
        self._drop = False  # set by ``join(discard=True)``: skip the jobs still queued
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._thread = threading.Thread(target=self._run, name="distconv-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self.error is None and not self._drop:
                try:
                    self._work(*job)
                except BaseException as e:
                    self.error = e

    def put(self, index: int, tensors: list[torch.Tensor]) -> None:
        self._queue.put((index, tensors))

    def join(self, discard: bool = False) -> BaseException | None:
        """Finish the queued jobs (``discard``: skip them; a job under way still ends) and
        join the thread; returns the first error."""
        self._drop = discard
        self._queue.put(None)
        self._thread.join()
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


class ReadAhead:
    """Chunks read by one background thread in the order they are expected to be asked for,
    holding at most ``limit`` bytes read and not yet taken (one chunk more when it alone is larger).

    ``take(key)`` returns a chunk; one not read yet is read next, ahead of the expected order
    (counted in ``misses``). Only the thread reads, so a source's reader is never used by two
    threads. ``close`` stops and joins the thread, on success and on error.
    """

    def __init__(self, order: list[Hashable], sizes: dict[Hashable, int], read: Callable[[Hashable], torch.Tensor],
                 limit: int) -> None:
        self._order, self._sizes, self._read, self._limit = list(order), sizes, read, limit
        self._done: dict[Hashable, tuple[torch.Tensor | None, BaseException | None]] = {}
        self._started: set[Hashable] = set()
        self._urgent: Hashable | None = None
        self._held = 0
        self._stopped = False
        self.misses = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="distconv-read-ahead", daemon=True)
        self._thread.start()

    def _next(self) -> Hashable | None:
        """Under the lock: the chunk to read now, or None to wait."""
        if self._urgent is not None and self._urgent not in self._started:
            return self._urgent
        while self._order and self._order[0] in self._started:
            self._order.pop(0)
        if not self._order:
            return None
        key = self._order[0]
        return key if self._held == 0 or self._held + self._sizes[key] <= self._limit else None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (key := self._next()) is None:
                    if not self._order and self._urgent is None:
                        return
                    self._cond.wait()
                if self._stopped:
                    return
                self._started.add(key)
            try:
                result: tuple[torch.Tensor | None, BaseException | None] = (self._read(key), None)
            except BaseException as e:
                result = (None, e)
            with self._cond:
                self._done[key] = result
                self._held += self._sizes[key]
                self._cond.notify_all()

    def take(self, key: Hashable) -> torch.Tensor:
        with self._cond:
            if key not in self._started:
                self.misses += 1
                self._urgent = key
                self._cond.notify_all()
            while key not in self._done:
                if not self._thread.is_alive():
                    raise RuntimeError(f"internal: the read-ahead thread ended without reading {key}")
                self._cond.wait(timeout=1.0)
            data, error = self._done.pop(key)
            self._held -= self._sizes[key]
            if self._urgent == key:
                self._urgent = None
            self._cond.notify_all()
        if error is not None:
            raise error
        return data

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()
        self._done.clear()
