"""distconv: distributed converter between Megatron checkpoints and Hugging Face model folders.

Where things are, by room: ``megatron/`` (megatron-core's checkpoint layout, reading torch_dist
and legacy checkpoints, the torch_dist save, megatron-core's model), ``hf/`` (HF folders: source,
sink, tokenizers, block-wise FP8), ``mindspore/`` (MindSpore Transformers as a source),
``families/`` (one declarative mapping table per model family), ``engine/`` (the run, plans,
collectives, streaming, progress, marker and output folder; no format), ``directions/`` (export,
import, reshard), and ``cli.py``, ``verify.py``, ``inspect.py``, ``watch.py``.
The functions below are the Python API; each is collective over the ranks of a torchrun job
(or runs as a group of one).
"""

from distconv.errors import DistconvError


def export(*args, **kwargs):
    """Megatron checkpoint -> HF folder; see ``distconv.directions.export.export``."""
    from distconv.directions.export import export as _export

    return _export(*args, **kwargs)


def import_hf(*args, **kwargs):
    """HF folder -> Megatron torch_dist; see ``distconv.directions.import_.import_hf``."""
    from distconv.directions.import_ import import_hf as _import_hf

    return _import_hf(*args, **kwargs)


def reshard(*args, **kwargs):
    """Megatron checkpoint -> Megatron torch_dist at another layout; see ``distconv.directions.reshard.reshard``."""
    from distconv.directions.reshard import reshard as _reshard

    return _reshard(*args, **kwargs)


def weights(*args, **kwargs):
    """A live megatron-core model's or a checkpoint's HF tensors for a serving engine's weight update
    (vLLM's ``WeightSource``); see ``distconv.directions.weights.weights``."""
    from distconv.directions.weights import weights as _weights

    return _weights(*args, **kwargs)


__all__ = ["DistconvError", "export", "import_hf", "reshard", "weights"]
