"""Progress bars, the run report and the ``--dry-run`` plan, all printed by rank 0 alone.

The run calls a ``Tracker`` at a few points (after planning, after each unit, before and after
finishing). Bars are tqdm's (bytes, with rates), shown only on a terminal and
without ``--quiet``. The report (phase times, bytes, GB/s, peak RSS and bytes read from storage
of every rank and, when gathering on GPUs, peak CUDA memory, tensor count) is gathered to rank
0 over the control group and stored in the output's marker (``distconv.json``) and, with
``--report PATH``, in a file of its own.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from distconv.engine.plan import Plan, Read, Slab
from distconv.errors import DistconvError, warn


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def storage_bytes_read(path: str = "/proc/self/io") -> int | None:
    """Bytes this process has read from storage so far: ``read_bytes`` of ``/proc/self/io``.

    ``read_bytes`` counts what the kernel fetched from the block device on this process's
    behalf: ``read()`` calls that missed the page cache, the read-ahead they start, and page
    faults on memory-mapped files (how the legacy reader and ``torch.load(mmap=True)`` read).
    That is the honest figure for "what did this rank cost the storage". ``rchar`` is not used:
    it counts every byte ``read()`` returned, page-cache hits and pipes and sockets included, and
    misses memory-mapped reads entirely. The file describes the whole process (every thread,
    live or exited), so the reader's threads are counted. Limits of the figure: a page already in
    the page cache (an earlier run, another rank on the node that read it first) costs nothing
    and counts nothing; read-ahead is counted at the granularity the kernel read; filesystems
    whose reads bypass the block layer count nothing (tmpfs always, and possibly network
    filesystems). ``None`` where there is no such file (not Linux, or a sandbox hiding it).
    """
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "read_bytes":
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


def _gbps(nbytes: int | None, seconds: float) -> float | None:
    if nbytes is None:
        return None
    return round(nbytes / seconds / 1e9, 3) if seconds > 0 else 0.0


class Tracker:
    """Timing, byte counts and progress bars of one run."""

    def __init__(self, rank: int, world: int, control: Any, quiet: bool) -> None:
        self.rank, self.world, self.control = rank, world, control
        self.quiet = quiet
        self.start = time.perf_counter()
        self.marks: dict[str, float] = {}
        self.read_bar = self.write_bar = None
        self.written = 0
        self.plan: Plan | None = None
        self.io: dict[str, int | None] = {}  # storage_bytes_read() when the conversion starts and ends

    def _mark(self, phase: str) -> None:
        self.marks[phase] = time.perf_counter()

    def planned(self, plan: Plan) -> None:
        """Planning is over; open the bars (rank 0, on a terminal, unless quiet)."""
        self._mark("plan")
        self.plan = plan
        self.io["plan"] = storage_bytes_read()
        if self.rank != 0 or self.quiet or not sys.stderr.isatty():
            return
        from tqdm import tqdm

        total_read = sum(plan.bytes_read_by(r) for r in range(plan.world))
        mine = plan.bytes_written_by(0)
        common = dict(unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr, dynamic_ncols=True)
        self.read_bar = tqdm(total=total_read if plan.world > 1 and mine == plan.total_bytes else plan.bytes_read_by(0),
                             desc="read+gather" if mine == plan.total_bytes else "read (rank 0)", position=0, **common)
        desc = "write      " if mine == plan.total_bytes else "write (rank 0's files)"
        self.write_bar = tqdm(total=mine, desc=desc, position=1, **common)

    def advance(self, bytes_read: int, bytes_written: int) -> None:
        """Rank 0 has read (or gathered) ``bytes_read`` more bytes; its own files hold ``bytes_written`` so far."""
        if self.read_bar is not None:
            self.read_bar.update(bytes_read)
            self._wrote(bytes_written)

    def _wrote(self, bytes_written: int) -> None:
        if self.write_bar is not None:
            self.write_bar.update(bytes_written - self.written)
        self.written = bytes_written

    def converted(self, bytes_written: int) -> None:
        """Every unit is read, gathered and written; close the bars."""
        self._mark("convert")
        self.io["convert"] = storage_bytes_read()
        self._wrote(bytes_written)
        for bar in (self.read_bar, self.write_bar):
            if bar is not None:
                bar.close()

    def bytes_read(self) -> int | None:
        """Bytes this rank read from storage during the conversion (see ``storage_bytes_read``).

        Measured from the end of planning to the end of the conversion, the span ``read_gbps``
        divides by and the reads ``bytes_read_planned`` counts; describing the checkpoint before
        that (metadata, on every rank) is not included. ``None`` where it cannot be measured.
        """
        start, end = self.io.get("plan"), self.io.get("convert")
        return None if start is None or end is None else end - start

    def report(self) -> dict[str, Any]:
        """Collective: the run report with every rank's peak memory and reads, on every rank.

        ``bytes_read`` is measured (``None`` where unmeasurable; never the plan's figure under
        that name); ``bytes_read_planned`` is the tensor bytes the plan had the rank read, and
        ``bytes_gathered`` those read on other ranks than the writer they went to.
        """
        mine = {"rank": self.rank, "host": os.uname().nodename, "peak_rss_bytes": peak_rss_bytes(),
                "bytes_read": self.bytes_read(),
                "bytes_read_planned": self.plan.bytes_read_by(self.rank) if self.plan else 0}
        # NCCL gathering: device memory too; like peak_rss_bytes, the process's peak (the hook leaves
        # the caller's statistics alone, so inside a training job it counts the training's too)
        if torch.cuda.is_initialized():
            mine["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        ranks = [mine]
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, mine, group=self.control)
        plan_s = self.marks["plan"] - self.start
        convert_s = self.marks["convert"] - self.marks["plan"]
        assert self.plan is not None
        measured = [r["bytes_read"] for r in ranks]
        read = None if None in measured else sum(measured)
        return {
            "tensors": self.plan.tensors,
            "files": len(self.plan.files),
            "world_size": self.world,
            "bytes_read": read,
            "bytes_read_planned": sum(r["bytes_read_planned"] for r in ranks),
            "bytes_gathered": self.plan.gathered_bytes,
            "bytes_written": self.plan.total_bytes,
            "seconds": {"plan": round(plan_s, 3), "convert": round(convert_s, 3)},
            "read_gbps": _gbps(read, convert_s),
            "write_gbps": _gbps(self.plan.total_bytes, convert_s),
            "ranks": ranks,
        }

    def finished(self, report: dict[str, Any], path: str | Path | None) -> dict[str, Any]:
        """Add the finish phase and total time; write ``--report PATH`` (rank 0)."""
        now = time.perf_counter()
        report["seconds"]["finish"] = round(now - self.marks["convert"], 3)
        report["seconds"]["total"] = round(now - self.start, 3)
        if path is not None and self.rank == 0:
            try:
                Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")
            except OSError as e:  # checked before the work; the export itself is complete
                warn(f"the export is complete, but --report {path} could not be written: {e.strerror or e}")
        return report


def check_report_path(path: str | Path | None) -> Path | None:
    """``--report PATH`` made absolute, its folder created; refused before any work if unwritable."""
    if path is None:
        return None
    path = Path(path).resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DistconvError(f"--report {path}: cannot create its folder: {e.strerror or e}") from None
    if path.is_dir() or not os.access(path if path.exists() else path.parent, os.W_OK):
        raise DistconvError(f"--report {path}: not a writable file path")
    return path


def plan_text(plan: Plan, files_read: Callable[[list[Read]], list[str]], save: Path, small_files: str) -> str:
    """The ``--dry-run`` listing of any conversion: what each rank would read (``files_read``: the
    source's files some reads touch) and write, and the files that would be written: the plan's
    tensor files with their writers, and by rank 0 its other files and the sink's ``small_files``."""
    lines = [f"dry run: nothing is read or written. {plan.world} rank(s) would read:"]
    for rank in range(plan.world):
        reads = [r for u in plan.units for r in u.reads if r.rank == rank]
        files = files_read(reads)
        lines.append(f"  rank {rank}: {len(reads)} slices of {len({r.key for r in reads})} tensors, "
                     f"{plan.bytes_read_by(rank) / 1e6:.3f} MB from {', '.join(files[:6]) or 'nothing'}"
                     f"{' ...' if len(files) > 6 else ''}; writes {plan.bytes_written_by(rank) / 1e6:.3f} MB")
    lines.append(f"and would write {save}/ (atomically), {plan.tensors} tensors, {plan.total_bytes / 1e6:.3f} MB:")
    writer_of = {o.file: u.writer for u in plan.units for o in u.outputs}
    for file in plan.files:
        outs = [o for o in plan.outputs if o.file == file]
        if outs:
            lines.append(f"  {file}: {sum(not isinstance(o.place, Slab) or o.place.index == 0 for o in outs)} tensors, {sum(o.nbytes for o in outs) / 1e6:.3f} MB of tensor data "
                         f"(written by rank {writer_of[file]})")
    lines.append(f"  {', '.join([f for f in plan.files if f not in writer_of] + [small_files])}, by rank 0")
    return "\n".join(lines)
