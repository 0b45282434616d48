"""``distconv.json``: the marker a finished conversion carries, which makes conversions idempotent.

Rank 0 writes it into the hidden output folder after every other file, just before the
folder is renamed into place, so a folder at ``--save`` with a valid marker is complete. It
names the source (iteration folder, iteration, a hash of the training args), the export
options, the tensor count, every file's size and SHA-256, and the run report. Asked again for
the same source and options, an export whose marker checks out (every file re-hashed) is
skipped; a folder without a marker is not distconv's finished work and is redone only with
``--overwrite`` (the watcher redoes only folders that hold a marker). The marker lists the
folder's complete contents: a folder holding anything it does not list, or lacking a file its
format needs (the sink's ``complete``), is not finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from distconv.errors import DistconvError

MARKER = "distconv.json"
_CHUNK = 16 << 20


def args_hash(args: Any) -> str:
    """SHA-256 of the checkpoint's training args (sorted, values as text)."""
    text = json.dumps(vars(args), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def source_of(ckpt: Any, options: dict[str, Any]) -> dict[str, Any]:
    """What identifies an export: the iteration folder, its args, and the options that shape the output."""
    return {
        "path": str(Path(ckpt.path).resolve()),
        "iteration": ckpt.iteration,
        "args_sha256": args_hash(ckpt.args),
        "options": options,
    }


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


class HashedWrites:
    """Writes buffers into files while a second thread computes each file's SHA-256 (``sums``: file
    -> bytes, sha256), so that the marker needs no second pass over what this run wrote.
    ``hashlib`` releases the GIL for buffers over 2 KiB, as file writes do: on a free core the hash
    costs no time. A buffer is hashed before ``write`` returns (the caller may reuse it)."""

    OVERLAP_FROM = 1 << 20  # smaller buffers are hashed in the writing thread (a hand-off costs more)

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, Any]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distconv-hash")

    def write(self, file: Any, sha: Any, data: Any) -> int:
        """``file.write(data)``, with ``sha.update(data)`` beside it; returns what the write returned."""
        if memoryview(data).nbytes < self.OVERLAP_FROM:
            sha.update(data)
            return file.write(data)
        hashed = self._pool.submit(sha.update, data)
        try:
            return file.write(data)
        finally:
            hashed.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def file_sums(folder: Path, known: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file in ``folder``; ``known`` ones (hashed as they were
    written) are taken as given, the rest are hashed in parallel threads."""
    known = known or {}
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.name != MARKER and p.relative_to(folder).as_posix() not in known)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(1, len(names)))) as pool:
        sums = list(pool.map(lambda n: sha256(folder / n), names))
    return dict(sorted({**known, **{n: {"bytes": (folder / n).stat().st_size, "sha256": s} for n, s in zip(names, sums)}}.items()))


def write_marker(folder: Path, source: dict[str, Any], tensors: int, report: dict[str, Any],
                 known: dict[str, dict[str, Any]] | None = None) -> None:
    """Write the marker last, flushed to disk."""
    data = {"distconv": _version(), "source": source, "tensors": tensors, "files": file_sums(folder, known),
            "report": report}
    try:
        with open(folder / MARKER, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise DistconvError(f"cannot write {folder / MARKER}: {e.strerror or e}") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("distconv")
    except PackageNotFoundError:
        return "unknown"


def read_marker(save: str | Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(save) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


Complete = Callable[[Path, set[str]], bool]
"""A sink's check that a folder's files (relative names) hold everything its format needs, reading
the folder's own index files for the files they name (``hf.sink.complete``, ``megatron.save.complete``)."""


def finished(save: str | Path, complete: Complete, source: dict[str, Any] | None = None) -> bool:
    """True when ``save`` holds a complete output (of ``source``, if given): the marker matches, it
    lists exactly the folder's contents, those include every file the format needs (``complete``),
    and every file has its recorded size and SHA-256 (re-hashed, in parallel threads)."""
    data = read_marker(save)
    if data is None or (source is not None and data.get("source") != json.loads(json.dumps(source, default=str))):
        return False
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        return False
    folder = Path(save)
    if not _lists_everything(folder, set(files)):
        return False
    try:
        if not complete(folder, set(files)):
            return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DistconvError):  # an index that does not read
        return False
    for name, info in files.items():
        path = folder / name
        if not _relative(name) or not isinstance(info, dict) or not path.is_file() or path.is_symlink() \
                or path.stat().st_size != info.get("bytes"):
            return False
    names = sorted(files)
    try:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(names))) as pool:
            sums = list(pool.map(lambda n: sha256(folder / n), names))
    except OSError:
        return False
    return all(files[n].get("sha256") == s for n, s in zip(names, sums))


def _lists_everything(folder: Path, listed: set[str]) -> bool:
    """The folder holds the marker, the files it lists and the folders they lie in, and nothing else
    (a file, link or folder planted into a finished output makes it unfinished)."""
    parents = {p.as_posix() for name in listed for p in Path(name).parents if p != Path(".")}
    found: set[str] = set()
    for root, dirs, names in os.walk(folder):  # links are listed, never followed
        here = Path(root).relative_to(folder)
        for name in dirs:
            entry = (here / name).as_posix()
            if (Path(root) / name).is_symlink() or entry not in parents:
                return False
        found.update((here / name).as_posix() for name in names)
    return found - {MARKER} == listed


def _relative(name: str) -> bool:
    """A marker's file name stays inside the output: relative, no ``..``, no backslash."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and "\\" not in name


def rank0_value(comm: Any, value: Any) -> Any:
    """Collective: rank 0's ``value`` on every rank (rank 0 alone looks at the file system)."""
    if comm.world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=comm.control)
    return box[0]
