"""Where a run may write and read: the output folder, and the file names sources give.

Every sink writes into a hidden sibling of ``--save``, renamed onto it at the end: an interrupted
run therefore never leaves a folder that looks complete, the source is never written into, over
or around, and nothing this run did not create is ever removed. One run at a time writes a
``--save``: it holds an advisory lock on the sibling ``.NAME.distconv-lock``. A file name a
source gives (a checkpoint's data file, an HF index's shard) is followed only inside the
source's folder.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from distconv.errors import DistconvError, warn


def refuse_overlap(save: Path, sources: Iterable[str | Path | None]) -> None:
    """``save`` may not be, lie inside, or contain any source (compared after resolving symlinks).

    ``sources`` name the folders given and every file the run reads in them, so that a file which
    is a link is checked where it leads."""
    target = Path(save).resolve()
    for source in sources:
        if source is None:
            continue
        src = Path(source).resolve()
        how = ("is" if target == src else "is inside" if src in target.parents
               else "contains" if target in src.parents else None)
        if how:
            raise DistconvError(f"--save {target} {how} the source {src}; distconv never writes into, over or "
                                "around what it reads: choose another --save")


def files_in(folder: str | Path | None) -> list[Path]:
    """The files and links directly in ``folder`` (none when it is no folder): what transformers may
    read from an HF folder, for ``refuse_overlap``, which follows each link."""
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir() if p.is_symlink() or not p.is_dir())


def _remove(path: Path) -> None:
    """Delete a file, link or folder this run moved aside."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


class OutputFolder:
    """A temporary sibling of ``save``, named per run, that becomes ``save`` on ``commit``.

    ``save`` is resolved first: a symlink is followed and the output replaces its target. It may
    not be, contain or lie inside any of ``sources``. Only the temporary folder this run created
    is ever removed on failure; partial folders left by earlier runs are reported, and removed
    only with ``overwrite``.
    """

    def __init__(self, save: str | Path, overwrite: bool, sources: Iterable[str | Path | None] = ()) -> None:
        self.save = Path(save).resolve()
        refuse_overlap(self.save, sources)
        self.overwrite = overwrite
        self._refuse_existing()
        self.created = False
        self.lock = SaveLock(self.save)
        self.name_run(uuid.uuid4().hex[:8])

    def _refuse_existing(self) -> None:
        if self.save.exists() and (not self.save.is_dir() or any(self.save.iterdir())) and not self.overwrite:
            kind = "is a file" if not self.save.is_dir() else "exists and is not empty"
            raise DistconvError(f"--save {self.save} {kind}; pass --overwrite to replace it")

    def name_run(self, token: str) -> None:
        """Give this run's temporary folder a name every rank agrees on."""
        self.tmp = self.save.parent / f".{self.save.name}.distconv-partial-{token}"

    def _stale(self) -> list[Path]:
        return sorted(p for p in self.save.parent.glob(f".{self.save.name}.distconv-partial*") if p != self.tmp)

    def create(self) -> Path:
        """Lock ``save`` for this run, then create this run's folder. Under the lock no other live
        run has a partial folder of ``save``, so those found are of runs that died."""
        try:  # --save's parent (and the lock file's) may not exist yet, e.g. the watcher's SAVE/iter_XXXXXXX
            self.save.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DistconvError(f"cannot create output folder next to {self.save}: {e.strerror or e}") from None
        self.lock.acquire()
        try:
            self._refuse_existing()  # again, under the lock: another run may have finished meanwhile
            stale = self._stale()
            if stale and self.overwrite:
                for old in stale:
                    _remove(old)
                warn(f"removed {len(stale)} partial folder(s) of earlier runs (--overwrite): {', '.join(map(str, stale))}")
            elif stale:
                warn(f"partial folder(s) of earlier, unfinished runs next to --save: {', '.join(map(str, stale))}; "
                      "remove them, or pass --overwrite to have them removed")
            try:
                self.tmp.mkdir(parents=True)
            except OSError as e:
                raise DistconvError(f"cannot create output folder next to {self.save}: {e.strerror or e}") from None
        except BaseException:
            self.lock.release()
            raise
        self.created = True
        return self.tmp

    def commit(self) -> None:
        """Rename this run's folder onto ``save``; whatever ``save`` held is then removed."""
        old = None
        here = _cwd_is(self.save)
        if self.save.exists():
            old = self.save.parent / f".{self.save.name}.distconv-old-{uuid.uuid4().hex[:8]}"
            os.replace(self.save, old)
        try:
            os.replace(self.tmp, self.save)
        except OSError as e:
            if old is not None:  # put back what --save held
                os.replace(old, self.save)
            raise DistconvError(f"cannot rename the finished output {self.tmp} onto {self.save}: {e.strerror or e}") from e
        self.created = False
        if here:  # the process stood in the replaced folder: stand in the new one
            os.chdir(self.save)
        if old is not None:
            try:
                _remove(old)
            except OSError as e:
                warn(f"the export is complete, but what --save held before could not be removed: {old} ({e.strerror or e})")
        self.lock.release()

    def abort(self) -> None:
        """Remove this run's temporary folder, if it created one, and unlock ``save``."""
        if self.created:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.created = False
        self.lock.release()


class SaveLock:
    """An advisory lock (``flock``) on ``.NAME.distconv-lock`` next to ``save``, held by one process
    (rank 0) from before it creates its partial folder until after the rename or the clean-up; the
    kernel releases it when the process dies.

    The lock file is removed on release only when this run created it (one left by a killed run
    stays, empty, and is reused); it is removed while still locked, and a run that locked a file
    which meanwhile left its name opens the name again, so two runs never hold two different files.
    A lock file that is a link is refused.
    """

    def __init__(self, save: Path) -> None:
        self.save = save
        self.path = save.parent / f".{save.name}.distconv-lock"
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> None:
        for _ in range(8):
            fd, created = self._open()
            if fd is None:
                continue  # removed between two looks: open it again
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DistconvError(f"--save {self.save} is being written by another distconv run, which holds "
                                    f"{self.path}; wait for it, or choose another --save") from None
            except OSError as e:  # a file system without flock (Lustre mounted without -o flock)
                self.fd, self.created = fd, created
                self.release()
                warn(f"the file system of {self.path} cannot lock files ({e.strerror or e}): nothing stops another run "
                     "from writing the same --save meanwhile")
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                self.fd, self.created = fd, created
                return
            os.close(fd)  # the run that held it removed it: lock the new one
        raise DistconvError(f"cannot lock {self.path}: it keeps being replaced by other processes")

    def _open(self) -> tuple[int | None, bool]:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        except OSError as e:
            raise DistconvError(f"cannot create the lock file {self.path} next to --save: {e.strerror or e}") from None
        try:
            return os.open(self.path, flags), False
        except FileNotFoundError:
            return None, False
        except OSError as e:  # a link (ELOOP), or not readable
            raise DistconvError(f"cannot use the lock file {self.path}: {e.strerror or e}; remove it") from None

    def release(self) -> None:
        if self.fd is None:
            return
        if self.created:  # removed while still held, so that no other run locks the removed file for good
            try:
                self.path.unlink()
            except OSError:
                pass
        os.close(self.fd)
        self.fd, self.created = None, False


def _cwd_is(path: Path) -> bool:
    try:
        return os.path.samefile(os.getcwd(), path)
    except OSError:
        return False


def inside(folder: Path, name: Any, what: str) -> Path:
    """``folder / name`` for a file name a checkpoint gives, refused unless it stays in ``folder``.

    The name must be relative, without ``..``, and its directories must resolve inside the
    folder; the file itself may be a symlink (checkpoints assembled from links stay readable).
    """
    if not isinstance(name, str) or not name:
        raise DistconvError(f"{what} names a data file {name!r}, which is not a file name")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise DistconvError(f"{what} names the data file {name!r} outside the checkpoint folder; refused")
    path = folder / rel
    root = folder.resolve()
    parent = path.parent.resolve()
    if parent != root and root not in parent.parents:
        raise DistconvError(f"{what} names the data file {name!r}, whose folder resolves outside the checkpoint; refused")
    return path
