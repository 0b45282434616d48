"""The one exception type distconv shows to users, its one form of warning, and the conversion to it."""

import os
import resource
import sys
from pathlib import Path


class DistconvError(Exception):
    """A problem with the user's input or environment: printed once by rank 0, exit code 1."""


def warn(text: str) -> None:
    """One ``distconv: warning:`` line on stderr (callers print it from rank 0 only)."""
    print(f"distconv: warning: {text}", file=sys.stderr, flush=True)


def user_error(error: BaseException, doing: str | None = None, writing: Path | None = None) -> DistconvError:
    """``error`` as one readable ``DistconvError``.

    A ``DistconvError`` raised somewhere inside (also behind DCP's per-rank ``CheckpointException``
    or behind a ``raise ... from``) is kept as it is. Otherwise the line that names the cause is kept
    (DCP and megatron-core wrap the real error in many lines), prefixed by what was being ``doing``.
    A failure while ``writing`` under a folder that has no errno behind it (``torch.save`` reports
    a short write only as "unexpected pos") says so when that file system is full.
    """
    inner = next((e for e in _chain(error) if isinstance(e, DistconvError)), None)
    if isinstance(inner, DistconvError):
        return inner
    os_error = next((e for e in _chain(error) if isinstance(e, OSError) and e.strerror), None)
    if os_error is not None:
        text = f"{os_error.strerror}{f': {os_error.filename}' if os_error.filename else ''}"
    else:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        causes = [line for line in lines if "Error" in line or "error" in line]
        text = (causes[-1] if causes else lines[0]) if lines else type(error).__name__
        if not doing and not text.startswith(type(error).__name__):
            text = f"{type(error).__name__}: {text}"
        full = _full(writing) if writing is not None else None
        if full:
            text = f"{full} ({text})"
    return DistconvError(f"{doing} failed: {text}" if doing else text)


def _chain(error: BaseException) -> list[BaseException]:
    """``error``, then what it wraps: its cause, or the first of DCP's per-rank failures, and so on."""
    out: list[BaseException] = []
    inner: BaseException | None = error
    while inner is not None and all(inner is not e for e in out):
        out.append(inner)
        failures = getattr(inner, "failures", None)  # torch's CheckpointException: {rank: exception}
        wrapped = [f[0] if isinstance(f, tuple) and f else f for f in failures.values()] if isinstance(failures, dict) else []
        nested = next((f for f in wrapped if isinstance(f, BaseException)), None)  # DCP keeps (exception, traceback)
        inner = nested or inner.__cause__
    return out


def _full(folder: Path) -> str | None:
    """Why writes under ``folder`` may have come up short: its file system has under 1 MiB free,
    or a file there has reached this process's file size limit (``ulimit -f``)."""
    try:
        fs = os.statvfs(folder)
        free = fs.f_bavail * fs.f_frsize
        if free < 1 << 20:
            return f"No space left on device: {free} bytes free under {folder}"
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and any(f.is_file() and f.stat().st_size >= limit for f in folder.rglob("*")):
            return f"File too large: a file under {folder} reached the file size limit ({limit} bytes)"
    except OSError:
        pass
    return None
