"""Run many exports in one torchrun launch, through the Python API inside an existing group.

    torchrun --nproc-per-node N tests/export_jobs.py JOBS.json RESULTS.json

The test suite uses it to keep torchrun launches few. It also exercises the post-training
hook contract: ``distconv.export`` must reuse this script's process group and leave it alive.
A job is ``distconv.export``'s keyword arguments, plus optionally ``"wrong_mapping": NAME`` (export
with a deliberately broken gpt-oss table, ``wrong_mapping``), ``"stuck_writer": true`` (every
``fsync`` of distconv's writer thread hangs until the export has returned: ``stuck_writer``; the
result then also has every rank's error and the export's seconds) and ``"cold": FOLDER``: that
folder's files are evicted from the page cache once planning is over, so the conversion reads
them from storage and each rank's measured ``bytes_read`` shows what it read first; the
result's ``mapped`` then lists, per rank, the bytes of those files its memory maps hold as
the conversion ends (``mapped_bytes``), which shows what it touched even when cached.
"""

import contextlib
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import torch.distributed as dist

import distconv
from distconv.engine.progress import Tracker
from wrong_mapping import wrong_mapping


def drop_page_cache(folder: str | Path) -> None:
    """Evict the files under ``folder`` (or that one file) from the page cache.

    ``POSIX_FADV_DONTNEED`` evicts clean pages that no process maps; a freshly written file's
    dirty pages are written back first (``fsync``), or they would stay.
    """
    folder = Path(folder)
    for path in [folder] if folder.is_file() else folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def mapped_bytes(folder: Path) -> dict[str, int]:
    """Resident bytes of this process's memory maps of files under ``folder``, per file
    (``Rss`` of ``/proc/self/smaps``): the pages this process touched, wherever they came from."""
    out: dict[str, int] = {}
    path = None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
                path = Path(fields[5].rstrip("\n")) if len(fields) > 5 and fields[5].startswith("/") else None
            elif fields[0] == "Rss:" and path is not None and path.is_relative_to(folder):
                key = str(path.relative_to(folder))
                out[key] = out.get(key, 0) + int(fields[1]) * 1024
    return out


@contextlib.contextmanager
def cold_conversion(folder: str | None):
    """Drop ``folder`` from the page cache between planning and conversion, on every rank;
    yields a dict that receives ``mapped_bytes(folder)`` as the conversion ends.

    Not before the export: every rank describes the checkpoint, and on small files the memory
    maps' read-around pulls whole files into the cache then (the pages of a file still mapped
    cannot be evicted, hence the collection of describe's dropped maps first).
    """
    record: dict[str, int] = {}
    if folder is None:
        yield record
        return
    folder = Path(folder).resolve()
    planned, converted = Tracker.planned, Tracker.converted

    def planned_cold(self, plan):
        gc.collect()
        dist.barrier()
        drop_page_cache(folder)
        dist.barrier()
        planned(self, plan)

    def converted_mapped(self, bytes_written):
        converted(self, bytes_written)
        record.update(mapped_bytes(folder))

    with mock.patch.object(Tracker, "planned", planned_cold), mock.patch.object(Tracker, "converted", converted_mapped):
        yield record


@contextlib.contextmanager
def stuck_writer(on: bool):
    """``os.fsync`` called from distconv's writer thread (``distconv-writer``) blocks until this
    context exits, as a write to a hung file system would; other threads' calls are untouched.
    The stuck thread is released on exit (its export has failed by then) and ``os.fsync`` restored."""
    if not on:
        yield
        return
    release, real = threading.Event(), os.fsync

    def fsync(fd):
        if threading.current_thread().name == "distconv-writer":
            release.wait()
        return real(fd)

    try:
        with mock.patch("os.fsync", fsync):
            yield
    finally:
        release.set()


def main() -> None:
    jobs_path, results_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    results = []
    for job in json.load(open(jobs_path)):
        cold, wrong, stuck = job.pop("cold", None), job.pop("wrong_mapping", None), job.pop("stuck_writer", False)
        mapped: dict[str, int] = {}
        start = time.monotonic()
        try:
            with cold_conversion(cold) as mapped, wrong_mapping(wrong), stuck_writer(stuck):
                report = distconv.export(**job, quiet=True)
            results.append({"ok": True, "report": report})
        except distconv.DistconvError as e:
            results.append({"ok": False, "error": str(e)})
        if stuck:  # every rank's outcome, and how long the export took to fail
            results[-1]["seconds"] = time.monotonic() - start
            results[-1]["rank_errors"] = [None] * dist.get_world_size()
            dist.all_gather_object(results[-1]["rank_errors"], results[-1].get("error"))
        results[-1]["group_alive"] = dist.is_initialized()
        if cold is not None:  # every rank's maps of the cold files: rank -> {file: bytes}
            results[-1]["mapped"] = [None] * dist.get_world_size()
            dist.all_gather_object(results[-1]["mapped"], mapped)
    if dist.get_rank() == 0:
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1, default=str)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
