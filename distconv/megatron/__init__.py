"""Megatron-LM and megatron-core checkpoints: the catalogue of megatron-core's layout, checkpoint
description and readers (torch_dist, legacy), the torch_dist save, and megatron-core's model."""
