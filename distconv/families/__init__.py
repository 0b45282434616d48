"""Model families, in detection order: the first whose ``detect`` accepts a spec is chosen."""

from distconv.families.base import Family, pick_family
from distconv.families.gpt2 import GPT2
from distconv.families.llama import LLAMA
from distconv.families.mistral import MISTRAL
from distconv.families.qwen2 import QWEN2
from distconv.families.qwen3 import QWEN3

FAMILIES: tuple[Family, ...] = (GPT2, QWEN3, QWEN2, MISTRAL, LLAMA)

__all__ = ["FAMILIES", "Family", "pick_family"]
