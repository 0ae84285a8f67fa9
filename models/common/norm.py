"""Layer norms for megatron-core specs.

megatron-core's torch-norm wrapper refuses sequence parallelism. These build the same torch
LayerNorm/RMSNorm and mark their parameters for the TP gradient sum the engine does after backward
(`parallel.sequence_parallel`):

- `Norm` (and the fixed-kind `LayerNorm` / `RMSNorm`): the layer's input and pre-MLP norms and the
  block's final norm. Under sequence parallelism each TP rank normalises its own slice of the
  sequence, so the gradient of the shared gain is partial and summed over TP (`sequence_parallel`).
- `QKNorm`: per-head query/key norms (qk-norm). Each TP rank normalises only its own heads with the
  shared gain, so the gradient is partial with or without SP (`grad_summed_over_tp`), as
  megatron-core's `finalize_model_grads` sums q_layernorm/k_layernorm gradients over TP.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

NORMALIZATIONS = ("LayerNorm", "RMSNorm")


def _torch_norm(kind: str, hidden_size: int, eps: float, dtype) -> torch.nn.Module:
    if kind == "LayerNorm":
        return torch.nn.LayerNorm(hidden_size, eps=eps, dtype=dtype)
    if kind == "RMSNorm":
        return torch.nn.RMSNorm(hidden_size, eps=eps, dtype=dtype)
    raise ValueError(f"normalization={kind!r}: use LayerNorm or RMSNorm")


class Norm:
    """Spec-compatible constructor of the norm `config.normalization` names. A class, not a function:
    megatron's `build_module` returns plain functions as they are instead of calling them."""

    kind: str | None = None  # None: follow config.normalization

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused) -> torch.nn.Module:
        kind = cls.kind or config.normalization
        if cls.kind is not None and config.normalization != cls.kind:
            raise ValueError(f"the layer spec asks for {cls.kind} but TransformerConfig.normalization="
                             f"{config.normalization!r}: build both from the same `normalization`")
        norm = _torch_norm(kind, hidden_size, eps, config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


class LayerNorm(Norm):
    kind = "LayerNorm"


class RMSNorm(Norm):
    kind = "RMSNorm"


class QKNorm:
    """Per-head query/key norm (megatron's q_layernorm / k_layernorm), of `config.normalization`."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused) -> torch.nn.Module:
        norm = _torch_norm(config.normalization, hidden_size, eps, config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = False
            param.grad_summed_over_tp = True
        return norm


def norm_class(normalization: str) -> type:
    """The spec entry for a norm of this kind."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}: use LayerNorm or RMSNorm")
    return LayerNorm if normalization == "LayerNorm" else RMSNorm


def build_norm(config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> torch.nn.Module:
    return Norm(config, hidden_size, eps=eps)
