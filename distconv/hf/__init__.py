"""Hugging Face folders: the safetensors source (block-wise FP8 dequantized as read), the folder
sink, tokenizers, and the block-wise FP8 format."""
