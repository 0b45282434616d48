"""The conversions: export (Megatron -> HF), import (HF or MindSpore -> Megatron) and reshard
(Megatron -> Megatron), each a configuration of a source, a sink and options for the engine."""
