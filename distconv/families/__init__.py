"""Model families, in detection order: the first whose ``detect`` accepts a spec is chosen."""

from distconv.families.base import Family, pick_family
from distconv.families.deepseek_v3 import DEEPSEEK_V3
from distconv.families.dsa import DEEPSEEK_V32, GLM_MOE_DSA
from distconv.families.glm4_moe import GLM4_MOE
from distconv.families.gpt2 import GPT2
from distconv.families.gpt_oss import GPT_OSS
from distconv.families.llama import LLAMA
from distconv.families.mistral import MISTRAL
from distconv.families.mixtral import MIXTRAL
from distconv.families.nemotron_h import NEMOTRON_H
from distconv.families.qwen2_moe import QWEN2_MOE
from distconv.families.qwen3_moe import QWEN3_MOE
from distconv.families.qwen2 import QWEN2
from distconv.families.qwen3 import QWEN3
from distconv.families.qwen3_next import QWEN3_5, QWEN3_5_MOE, QWEN3_NEXT

FAMILIES: tuple[Family, ...] = (NEMOTRON_H, GPT_OSS, QWEN3_NEXT, QWEN3_5_MOE, QWEN3_5, DEEPSEEK_V32, GLM_MOE_DSA,
                                 DEEPSEEK_V3, GLM4_MOE, QWEN2_MOE, QWEN3_MOE, MIXTRAL, GPT2, QWEN3, QWEN2, MISTRAL,
                                 LLAMA)

# hub ``model_type`` -> (architecture, transformers config class) for the types transformers lacks
# (``Family.model_types``), handed to ``hf.source.read_config`` by whoever reads an HF config
HUB_TYPES: dict[str, tuple[str, str]] = {t: (f.architecture, f.config_class) for f in FAMILIES for t in f.model_types}

__all__ = ["FAMILIES", "HUB_TYPES", "Family", "pick_family"]
