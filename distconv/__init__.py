"""distconv: distributed converter between Megatron checkpoints and Hugging Face folders."""

from distconv.errors import DistconvError


def export(*args, **kwargs):
    """Megatron torch_dist -> HF folder; see ``distconv.pipeline.export``."""
    from distconv.pipeline import export as _export

    return _export(*args, **kwargs)


def import_hf(*args, **kwargs):
    """HF folder -> Megatron torch_dist; see ``distconv.importer.import_hf``."""
    from distconv.importer import import_hf as _import_hf

    return _import_hf(*args, **kwargs)


__all__ = ["DistconvError", "export", "import_hf"]
