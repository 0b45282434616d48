"""distconv: distributed converter between Megatron checkpoints and Hugging Face model folders.

Where things are: ``engine/`` (the run skeleton, plans, collectives, progress and markers, and
the export / import / reshard configurations), ``sources/`` (Megatron torch_dist and legacy,
HF safetensors, MindSpore), ``sinks/`` (HF folder, Megatron save root, the atomic output
folder), ``families/`` (one declarative mapping table per model family), ``cli.py``.
The functions below are the Python API; each is collective over the ranks of a torchrun job
(or runs as a group of one).
"""

from distconv.errors import DistconvError


def export(*args, **kwargs):
    """Megatron checkpoint -> HF folder; see ``distconv.engine.export.export``."""
    from distconv.engine.export import export as _export

    return _export(*args, **kwargs)


def import_hf(*args, **kwargs):
    """HF folder -> Megatron torch_dist; see ``distconv.engine.to_megatron.import_hf``."""
    from distconv.engine.to_megatron import import_hf as _import_hf

    return _import_hf(*args, **kwargs)


def reshard(*args, **kwargs):
    """Megatron checkpoint -> Megatron torch_dist at another layout; see ``distconv.engine.to_megatron.reshard``."""
    from distconv.engine.to_megatron import reshard as _reshard

    return _reshard(*args, **kwargs)


__all__ = ["DistconvError", "export", "import_hf", "reshard"]
