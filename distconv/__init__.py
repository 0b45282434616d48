"""distconv: distributed converter between Megatron checkpoints and Hugging Face folders."""

from distconv.errors import DistconvError


def export(*args, **kwargs):
    """Megatron torch_dist -> HF folder; see ``distconv.pipeline.export``."""
    from distconv.pipeline import export as _export

    return _export(*args, **kwargs)


__all__ = ["DistconvError", "export"]
