"""Build megatron-core `TransformerConfig`s for towers from our config sections.

Fusions that need CUDA kernels (bias-gelu, bias-dropout, masked softmax, RoPE, persistent LN,
gradient-accumulation fusion) are off: they either fail on CPU or need Apex/TE. On GPU the SDPA or
flash kernels already carry attention; the remaining fusions are a throughput item for the
precision issue, behind the same spec.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "silu": F.silu}


def make_transformer_config(
    *,
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
    layernorm_epsilon: float = 1e-5,
    activation: str = "gelu",
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool = True,
    perform_initialization: bool = True,
    init_method_std: float = 0.02,
    sequence_parallel: bool = False,
    **extra,
) -> TransformerConfig:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: use one of {', '.join(ACTIVATIONS)}")
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}")
    tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    pp = parallel_state.get_pipeline_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    if num_attention_heads % tp:
        raise ValueError(
            f"num_attention_heads={num_attention_heads} is not divisible by tensor_model_parallel_size={tp}"
        )
    if ffn_hidden_size % tp:
        raise ValueError(f"ffn_hidden_size={ffn_hidden_size} is not divisible by tensor_model_parallel_size={tp}")
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        num_attention_heads=num_attention_heads,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        layernorm_epsilon=layernorm_epsilon,
        activation_func=ACTIVATIONS[activation],
        add_bias_linear=True,
        gated_linear_unit=False,
        normalization="LayerNorm",
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        init_method_std=init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        **extra,
    )
