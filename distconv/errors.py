"""The one exception type distconv shows to users, and its one form of warning."""

import sys


class DistconvError(Exception):
    """A problem with the user's input or environment: printed once by rank 0, exit code 1."""


def warn(text: str) -> None:
    """One ``distconv: warning:`` line on stderr (callers print it from rank 0 only)."""
    print(f"distconv: warning: {text}", file=sys.stderr, flush=True)
