"""Analytic training FLOPs of the decoder LLM, for tokens/s -> model FLOP utilisation (MFU).

Per sequence of S tokens, forward + backward (backward = 2 x forward), counting a multiply-add as
2 FLOPs, as PaLM (Chowdhery et al. 2022, appendix B) and Megatron-LM do:

    6 * N * S  +  12 * L * d_attn * S^2

- N: parameters that take part in a matrix multiply per token: every layer's QKV, output
  projection and MLP linears, plus the output layer (the logits; counted once more when tied,
  since the tied matrix is used twice). The embedding lookup and the norm gains do no matmul and
  are left out.
- 12 * L * d_attn * S^2: the attention scores Q K^T and the weighted sum A V, 2 * S * d_attn
  FLOPs each per token and layer in the forward pass, x 3 with the backward. d_attn = heads x
  head_dim. Causal masking is not discounted (the PaLM / Megatron convention; kernels that skip
  the masked half do less work than counted).
Recomputation (activation checkpointing) is not counted: MFU measures useful model work.
"""
from __future__ import annotations

from models.llm.config import LLMConfig


def matmul_parameters(cfg: LLMConfig) -> int:
    """N of the formula: parameters used in a matrix multiply for each token (true vocabulary)."""
    h, d, heads, groups, ffn = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.query_groups, cfg.ffn_hidden_size
    gated = cfg.activation in ("swiglu", "geglu")
    per_layer = h * (heads + 2 * groups) * d + heads * d * h + h * ffn * (2 if gated else 1) + ffn * h
    return cfg.num_layers * per_layer + cfg.vocab_size * h


def training_flops_per_sequence(cfg: LLMConfig, seq_length: int | None = None) -> float:
    """Forward + backward FLOPs of one sequence (the formula in the module docstring)."""
    s = cfg.seq_length if seq_length is None else seq_length
    d_attn = cfg.num_attention_heads * cfg.head_dim
    return 6.0 * matmul_parameters(cfg) * s + 12.0 * cfg.num_layers * d_attn * s * s
