"""The one exception type distconv shows to users."""


class DistconvError(Exception):
    """A problem with the user's input or environment: printed once by rank 0, exit code 1."""
