"""LLaVA-style vision-language model: CLIP ViT, MLP or perceiver connector, Llama-style LLM."""
