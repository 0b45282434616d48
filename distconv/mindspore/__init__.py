"""MindSpore Transformers (MindFormers) safetensors, read as an HF-named import source."""
