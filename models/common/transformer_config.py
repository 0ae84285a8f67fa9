"""Build megatron-core `TransformerConfig`s from a model family's config section.

The parallel layout is an argument (`tensor_model_parallel_size`, `pipeline_model_parallel_size`),
checked against the model's dimensions here with errors that name the key to change, and against
the running parallel state when there is one. `parallel_sizes()` gives the running layout for
callers that build the model of the current process.

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

from models.common.norm import NORMALIZATIONS


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu, "silu": F.silu, "relu": F.relu}
# Gated (GLU) activations by their usual names: the MLP's fc1 computes [gate; up] and the block
# applies act(gate) * up (megatron's gated_linear_unit). SwiGLU is Llama's MLP.
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}


def parallel_sizes() -> tuple[int, int]:
    """(TP, PP) of the running parallel state; (1, 1) without one (a plain process, the meta device)."""
    if not parallel_state.model_parallel_is_initialized():
        return 1, 1
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size())


def _check_layout(*, tp: int, pp: int, num_layers: int, hidden_size: int, ffn_hidden_size: int,
                  num_attention_heads: int, num_query_groups: int, kv_channels: int | None,
                  whole_model_on_stage: bool = False) -> None:
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor_model_parallel_size={tp} and pipeline_model_parallel_size={pp} must be >= 1")
    if kv_channels is None and hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads} "
                         "(set kv_channels for a head size of its own)")
    if num_attention_heads % tp:
        raise ValueError(f"num_attention_heads={num_attention_heads} is not divisible by "
                         f"tensor_model_parallel_size={tp}")
    if num_attention_heads % num_query_groups:
        raise ValueError(f"num_attention_heads={num_attention_heads} is not divisible by "
                         f"num_query_groups={num_query_groups}")
    if num_query_groups % tp:
        raise ValueError(f"num_query_groups={num_query_groups} (key/value heads) is not divisible by "
                         f"tensor_model_parallel_size={tp}")
    if ffn_hidden_size % tp:
        raise ValueError(f"ffn_hidden_size={ffn_hidden_size} is not divisible by tensor_model_parallel_size={tp}")
    if num_layers % pp:
        raise ValueError(f"num_layers={num_layers} is not divisible by pipeline_model_parallel_size={pp}")
    running = parallel_sizes()
    if whole_model_on_stage and pp == 1:  # all layers on this stage, whatever the run's PP
        running = (running[0], 1)
    if parallel_state.model_parallel_is_initialized() and running != (tp, pp):
        raise ValueError(f"the model is built for tensor_model_parallel_size={tp}, pipeline_model_parallel_size="
                         f"{pp} but the running parallel state is TP={running[0]}, PP={running[1]}")


def make_transformer_config(
    *,
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    tensor_model_parallel_size: int,
    pipeline_model_parallel_size: int,
    num_query_groups: int | None = None,
    kv_channels: int | None = None,
    normalization: str = "LayerNorm",
    activation: str = "gelu",
    gated_linear_unit: bool = False,
    add_bias_linear: bool = True,
    add_qkv_bias: bool = False,
    qk_layernorm: bool = False,
    rotary_interleaved: bool = False,
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
    layernorm_epsilon: float = 1e-5,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool = True,
    perform_initialization: bool = True,
    init_method_std: float = 0.02,
    sequence_parallel: bool = False,
    whole_model_on_stage: bool = False,
    **extra,
) -> TransformerConfig:
    """A megatron `TransformerConfig` with the CPU-safe fusions off.

    `num_query_groups`: key/value heads for grouped-query attention (None: one per head).
    `activation`: gelu, quick_gelu, silu, relu, or a gated name (swiglu = silu GLU, geglu = gelu GLU),
    which turns `gated_linear_unit` on. `add_bias_linear`: biases of every linear; `add_qkv_bias`:
    a QKV bias even without the others (Qwen2). `qk_layernorm`: a per-head norm of queries and keys
    (the layer spec must be built with `qk_layernorm=True` too). `rotary_interleaved`: rotate
    interleaved pairs (GPT-J / Meta's original layout) instead of halves (Hugging Face / NeMo).
    `whole_model_on_stage`: with pipeline_model_parallel_size=1, build every layer on this rank
    even when the run is pipelined (a frozen teacher beside one stage of the student).
    """
    if activation in GATED_ACTIVATIONS:
        activation, gated_linear_unit = GATED_ACTIVATIONS[activation], True
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: use one of {', '.join([*ACTIVATIONS, *GATED_ACTIVATIONS])}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}: use one of {', '.join(NORMALIZATIONS)}")
    groups = num_attention_heads if num_query_groups is None else num_query_groups
    _check_layout(tp=tensor_model_parallel_size, pp=pipeline_model_parallel_size, num_layers=num_layers,
                  hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size, num_attention_heads=num_attention_heads,
                  num_query_groups=groups, kv_channels=kv_channels, whole_model_on_stage=whole_model_on_stage)
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=groups,
        kv_channels=kv_channels,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        layernorm_epsilon=layernorm_epsilon,
        activation_func=ACTIVATIONS[activation],
        gated_linear_unit=gated_linear_unit,
        add_bias_linear=add_bias_linear,
        add_qkv_bias=add_qkv_bias,
        qk_layernorm=qk_layernorm,
        rotary_interleaved=rotary_interleaved,
        normalization=normalization,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        init_method_std=init_method_std,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        sequence_parallel=sequence_parallel,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # megatron's default "full" is deprecated and warns on every config (every rank, every
        # tower); the empty list is what it maps "full" to.
        cuda_graph_scope=[],
        **extra,
    )
