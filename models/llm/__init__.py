"""Llama-style decoder-only language model on megatron-core blocks."""
