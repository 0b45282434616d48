"""``distconv export --watch ROOT``: export each new iteration of a training run as it is saved.

Megatron-LM writes ``latest_checkpointed_iteration.txt`` after the iteration folder is
complete, so an iteration is exported once the tracker names it. Rank 0 alone reads the file
system and tells the other ranks (all of them run every export together). Each iteration goes
to ``SAVE/iter_XXXXXXX`` (``SAVE/release``), or to ``SAVE`` formatted with ``{iteration}`` and
``{name}`` when it holds a ``{``. A target holding a finished export (valid ``distconv.json``)
is skipped by the export itself; one whose marker does not check out (an unfinished or damaged
export) is redone; one without a marker is not distconv's and is left alone (that export fails,
as a plain export would); with ``overwrite`` every target is redone (as a plain export would).
Every other export option applies to each export; those naming one export (``iteration``,
``dry_run``, ``report``) are refused.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from distconv.engine.comm import Comm
from distconv.engine.folder import refuse_overlap
from distconv.engine.marker import MARKER, finished, rank0_value
from distconv.errors import DistconvError
from distconv.hf.sink import complete
from distconv.megatron.checkpoint import TRACKER, iteration_dir, tracker_iteration


def target(save: str | Path, iteration: int | str) -> Path:
    """Where an iteration is exported: ``SAVE/iter_XXXXXXX`` or the formatted pattern."""
    save = str(save)
    if "{" in save:
        try:
            return Path(save.format(iteration=iteration, name=iteration_dir(iteration)))
        except (KeyError, IndexError, ValueError) as e:
            raise DistconvError(f"--save pattern {save!r}: use {{iteration}} or {{name}} ({e})") from None
    return Path(save) / iteration_dir(iteration)


# export options that name one export, with why they do not combine with --watch
_REFUSED = {
    "iteration": ("--iteration", "the watcher exports each iteration the tracker names"),
    "dry_run": ("--dry-run", "use it with --load"),
    "report": ("--report", "each export's report is in its distconv.json"),
}


def tracked_iteration(root: Path) -> int | str | None:
    """The iteration the tracker names, or None while there is none (or it is empty: being written).

    Any other content is an error naming the file and what it holds.
    """
    tracker = root / TRACKER
    try:
        text = tracker.read_text()
    except OSError:
        return None
    return tracker_iteration(tracker, text) if text.strip() else None


def unfinished_export(dest: Path) -> bool:
    """``dest`` holds a ``distconv.json`` that does not check out: distconv's own unfinished or damaged
    export, which the watcher redoes. A folder without one is not distconv's: it is never redone
    (the export refuses it unless ``overwrite``)."""
    mark = dest / MARKER
    return mark.is_file() and not mark.is_symlink() and not finished(dest, complete)


def watch(
    root: str | Path,
    save: str | Path,
    *,
    poll_s: float = 60.0,
    idle_timeout_s: float | None = None,
    once: bool = False,
    device: str = "auto",
    timeout_s: float = 1800.0,
    quiet: bool = False,
    overwrite: bool = False,
    **export_options: Any,
) -> int:
    """Export every new iteration of ``root`` with ``export_options`` (``distconv.export``'s
    keywords); returns how many exports failed.

    Stops after one look with ``once``, or when no new iteration has appeared for
    ``idle_timeout_s`` seconds; otherwise runs until interrupted. Collective over all ranks.
    """
    from distconv.directions.export import export

    for key, (flag, why) in _REFUSED.items():
        if export_options.pop(key, None) not in (None, False):
            raise DistconvError(f"{flag} does not combine with --watch ({why})")
    root = Path(root)
    if not root.is_dir():
        raise DistconvError(f"--watch {root}: no such directory")
    refuse_overlap(target(save, 0), (root,))  # a bad pattern or a --save in the save root fails before any waiting
    comm = Comm.setup(device, timeout_s, quiet)
    try:
        done: set[int | str] = set()
        failures = 0
        last = time.monotonic()
        say = (lambda text: print(text, flush=True)) if comm.rank == 0 and not quiet else (lambda text: None)
        say(f"watching {root / TRACKER} (every {poll_s:g} s)")
        while True:
            looked, error = None, None
            if comm.rank == 0:
                try:
                    looked = tracked_iteration(root)
                except DistconvError as e:
                    error = e
            comm.agree(error)
            iteration = rank0_value(comm, looked)
            if iteration is not None and iteration not in done:
                done.add(iteration)
                dest = target(save, iteration)
                redo = rank0_value(comm, comm.rank == 0 and unfinished_export(dest))
                say(f"iteration {iteration} -> {dest}{' (redoing an unfinished export)' if redo else ''}")
                try:
                    export(root, dest, iteration=iteration, overwrite=overwrite or redo, device=device, timeout_s=timeout_s,
                           quiet=quiet, **export_options)
                except DistconvError as e:
                    failures += 1
                    if comm.rank == 0:
                        print(f"distconv: error: iteration {iteration}: {e}", file=sys.stderr, flush=True)
                last = time.monotonic()
            idle = idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s
            if rank0_value(comm, once or idle):
                break
            time.sleep(poll_s)
        say(f"stopped watching: {len(done)} iteration(s) seen, {failures} failed")
        return failures
    finally:
        comm.close()
