"""Layer norms for megatron-core specs.

megatron-core's torch-norm wrapper refuses sequence parallelism. This one builds the same torch
LayerNorm/RMSNorm and marks its parameters `sequence_parallel` so the engine can all-reduce their
gradients over the TP group when the activations they see are sequence-sharded.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class Norm:
    """Spec-compatible constructor. A class, not a function: megatron's `build_module` returns plain
    functions as they are instead of calling them."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused) -> torch.nn.Module:
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization={config.normalization!r}: use LayerNorm or RMSNorm")
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


def build_norm(config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> torch.nn.Module:
    return Norm(config, hidden_size, eps=eps)
