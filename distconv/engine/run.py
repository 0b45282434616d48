"""One run of any conversion: plan, agree, print, skip or dry-run, stream into a temporary folder, commit.

Every direction (export to an HF folder, import and reshard to a Megatron save root) is a
``Job``: a plan every rank computes identically, and the collective ``convert`` that streams the
source into the sink. ``run`` is the skeleton they share: the plan's errors are agreed on (one
message, every rank exits), rank 0 prints the summary and warnings, ``--dry-run`` stops there,
a finished identical output (its ``distconv.json`` checks out) is skipped, and otherwise the
output is written into a per-run hidden sibling of ``--save`` that is renamed onto it only after
the marker, so nothing at ``--save`` ever looks complete before it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import re
from pathlib import Path
from typing import Any, Callable, Protocol

from distconv.engine import marker
from distconv.engine.comm import Agreed, Comm
from distconv.engine.folder import OutputFolder
from distconv.engine.plan import Plan
from distconv.engine.progress import Tracker, check_report_path, plan_text
from distconv.engine.stream import Reader
from distconv.errors import DistconvError, warn

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, what: str = "size") -> int:
    """``5GB`` -> 5_000_000_000 (decimal units like transformers; KiB/MiB/GiB binary); positive only."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()]) if m and m.group(2).upper() in _UNITS else 0
    if size <= 0:
        raise DistconvError(f"{what} {text!r}: give a positive size, e.g. 5GB, 500MB or 2GiB")
    return size


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What every conversion takes, whatever its source and sink."""

    save: str | Path
    overwrite: bool = False
    window: str | int = "256MiB"
    timeout_s: float = 1800.0
    quiet: bool = False
    dry_run: bool = False
    report: str | Path | None = None


class Job(Protocol):
    """A planned conversion, identical on every rank."""

    kind: str  # "export", "import", "reshard": for messages
    save: Path
    inputs: tuple[str | Path | None, ...]  # what ``save`` must stay clear of
    identity: dict[str, Any]  # the source and options, recorded in and compared with ``distconv.json``
    warnings: list[str]
    plan: Plan
    reader: Reader  # the source's
    small_files: str  # what the sink writes besides the plan's tensors (for ``--dry-run``)
    complete: marker.Complete  # whether a folder's files hold what the sink's format needs

    def summary(self, world: int) -> str: ...
    def convert(self, comm: Comm, tmp: Path, tracker: Tracker) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """Collective: stream everything into ``tmp``; returns fields for the report (the same on
        every rank) and this rank's files hashed as written (name -> bytes, sha256)."""
    def finish(self, tmp: Path, report: dict[str, Any]) -> None:
        """Rank 0, after ``convert``: the small files (config, tokenizer, index), before the marker."""
    def done_text(self, report: dict[str, Any]) -> str: ...


def agreed(comm: Comm, fn: Callable[[], Any]) -> Any:
    """Collective: ``fn()`` on every rank; if it fails on any, every rank raises the one message."""
    value, error = None, None
    try:
        value = fn()
    except Exception as e:
        error = e
    comm.agree(error)
    return value


@contextlib.contextmanager
def collector_paused() -> Any:
    """Python's cyclic garbage collector off, then back as it was (a caller's setting is kept).
    Planning makes hundreds of thousands of small objects (DCP metadata, the plan) and no garbage
    worth a pass: the passes the allocations trigger cost seconds on a 2 GB model (0.5-2 s of
    ``ExportJob``'s 0.6-2.2 s measured, varying with the heap), none of it needed."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def say(comm: Comm, quiet: bool, text: str) -> None:
    if comm.rank == 0 and not quiet:
        print(text, flush=True)


def run(comm: Comm, plan: Callable[[], Job], opts: RunOptions) -> dict[str, Any]:
    """Collective: plan, then skip, dry-run or convert; returns the report (the same on every rank)."""
    tracker = Tracker(comm.rank, comm.world, comm.control, opts.quiet)
    with collector_paused():
        job: Job = agreed(comm, plan)
    say(comm, opts.quiet, job.summary(comm.world))
    if comm.rank == 0:
        for warning in job.warnings:
            warn(warning)
    if opts.dry_run:
        say(comm, False, plan_text(job.plan, job.reader.files, job.save, job.small_files))
        return {"dry_run": True, "tensors": job.plan.tensors, "files": job.plan.files,
                "bytes_read": {r: job.plan.bytes_read_by(r) for r in range(comm.world)}}
    if marker.rank0_value(comm, comm.rank == 0 and not opts.overwrite and marker.finished(job.save, job.complete, job.identity)):
        say(comm, opts.quiet, f"{job.save} already holds this {job.kind} (its {marker.MARKER} and every file's checksum "
                              "check out): skipped")
        return {"skipped": True, "save": str(job.save), "tensors": job.plan.tensors}
    folder, report_path = agreed(comm, lambda: (
        OutputFolder(job.save, opts.overwrite, job.inputs),
        check_report_path(opts.report) if comm.rank == 0 else None))
    folder.name_run(comm.shared_token())
    agreed(comm, lambda: folder.create() if comm.rank == 0 else None)
    try:
        tracker.planned(job.plan)
        fields, known = job.convert(comm, folder.tmp, tracker)
        report = {**tracker.report(), **fields, "warnings": job.warnings}
        sums = {k: v for part in comm.collect(known) for k, v in part.items()}

        def finish() -> None:
            job.finish(folder.tmp, report)
            marker.write_marker(folder.tmp, job.identity, job.plan.tensors, report, known=sums)

        agreed(comm, finish if comm.rank == 0 else lambda: None)
        agreed(comm, folder.commit if comm.rank == 0 else lambda: None)  # a failed rename fails every rank
        report = tracker.finished(report, report_path)
    except BaseException:
        if comm.rank == 0:
            folder.abort()
        raise
    say(comm, opts.quiet, job.done_text(report))
    return report


def launch(make_job: Callable[[int], Job], opts: RunOptions, device: str = "cpu") -> dict[str, Any]:
    """Collective: one conversion in its own process groups (``Comm.setup``; inside a job whose
    default group exists, that one is reused and left as it was): ``make_job(world)`` planned and
    run, then the groups made for it destroyed (waiting for every rank only after a success), or
    after an error aborted, every rank raising the first failing rank's message (``Comm.fail``)."""
    comm = Comm.setup(device, opts.timeout_s, opts.quiet)
    try:
        result = run(comm, lambda: make_job(comm.world), opts)
    except Exception as e:
        agreed = comm.fail(e) if comm.world > 1 else e  # every rank's one message: the first failure's
        comm.close(clean=False)
        try:
            if agreed is e and not isinstance(e, Agreed):
                raise
            raise DistconvError(str(agreed)) from e
        finally:  # this frame must not hold the error its own traceback holds: a cycle would keep
            del agreed  # the run's objects (and a job's process group with them) alive until a gc
    except BaseException:
        comm.close(clean=False)
        raise
    comm.close(clean=True)
    return result
