"""Overlap of the stages: a reader thread runs ahead, a writer thread runs behind.

Per rank: the reader thread loads the next batch of groups (one ``dist_checkpointing.load``
call per batch, on the default process group) while the main thread gathers the current group
(on its own groups), and, on writer ranks, a writer thread maps and writes the previous one.
Both queues are bounded, so a rank holds at most a few groups at a time.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

from distconv.plan import Plan
from distconv.read import Reader


class Prefetcher:
    """Reads this rank's slices of every group, in plan order, ahead of the consumer."""

    def __init__(self, reader: Reader, plan: Plan, rank: int, batch_bytes: int, threaded: bool = True) -> None:
        """``threaded=False`` reads each batch only when the consumer reaches it."""
        self._total = len(plan.groups)
        self._stop = threading.Event()
        steps = self._steps(reader, plan, rank, batch_bytes)
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._fill, args=(steps,), name="distconv-reader", daemon=True)
            self._thread.start()
            self._next = self._queue.get
        else:
            self._next = lambda: next(steps)

    def _fill(self, steps) -> None:
        for step in steps:
            self._queue.put(step)

    def _steps(self, reader: Reader, plan: Plan, rank: int, batch_bytes: int):
        for batch in plan.batches(batch_bytes):
            if self._stop.is_set():
                return
            reads = [r for g in batch for r in plan.groups[g].reads_of(rank)]
            try:
                tensors = reader.read(reads, plan.dtype)
            except BaseException as e:  # handed to the consumer, which makes every rank agree
                yield batch, None, e
                return
            per_group, at = [], 0
            for g in batch:
                n = len(plan.groups[g].reads_of(rank))
                per_group.append(tensors[at : at + n])
                at += n
            yield batch, per_group, None

    def __iter__(self):
        """Yields ``(tensors, error)`` per group in plan order; after an error, only the error."""
        done = 0
        while done < self._total:
            batch, per_group, error = self._next()
            if error is not None:
                yield None, error
                return
            for tensors in per_group:
                yield tensors, None
            done += len(batch)

    def close(self, wait: bool) -> None:
        """Stop reading ahead; with ``wait``, also let the thread finish (it is a daemon)."""
        self._stop.set()
        while self._thread is not None:
            try:
                self._queue.get_nowait()  # unblock a pending put
            except queue.Empty:
                if not wait or not self._thread.is_alive():
                    return
                self._thread.join(timeout=0.1)


class WriterThread:
    """Runs ``work(group_index, tensors)`` in order on a background thread; keeps the first error."""

    def __init__(self, work: Callable[[int, list[torch.Tensor]], None]) -> None:
        self.error: BaseException | None = None
        self._work = work
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._thread = threading.Thread(target=self._run, name="distconv-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self.error is None:
                try:
                    self._work(*job)
                except BaseException as e:
                    self.error = e

    def put(self, index: int, tensors: list[torch.Tensor]) -> None:
        self._queue.put((index, tensors))

    def join(self) -> BaseException | None:
        self._queue.put(None)
        self._thread.join()
        return self.error
