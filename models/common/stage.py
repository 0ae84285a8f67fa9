"""One pipeline stage of a model built on megatron-core blocks: which layers it holds, whether it
embeds (first stage) or holds the head (last stage), and the vocabulary padding of its embedding.

Shared by every family (CLIP's towers, the LLM, the DiT, the VLM); nothing here knows a model.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from models.common.norm import build_norm, norm_class


def build_block(config: TransformerConfig, layer_spec: ModuleSpec, *, post_process: bool = True) -> TransformerBlock:
    """This pipeline stage's layers (megatron's even PP split, `get_num_layers_to_build`); the
    block's final norm (of `config.normalization`) only on the last stage."""
    layers = get_num_layers_to_build(config)
    submodules = TransformerBlockSubmodules(layer_specs=[layer_spec] * layers,
                                            layer_norm=norm_class(config.normalization))
    # pre_process stays True: hidden states are passed in directly, not through set_input_tensor.
    return TransformerBlock(config, submodules, post_layer_norm=True, pre_process=True, post_process=post_process)


def pipeline_stage_flags(pre_process: bool | None, post_process: bool | None) -> tuple[bool, bool]:
    """(first stage, last stage) of this rank, unless given; a single stage without parallel state."""
    initialized = parallel_state.model_parallel_is_initialized()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage() if initialized else True
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage() if initialized else True
    return pre_process, post_process


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int | None = None) -> int:
    """Megatron's rule: pad so every TP rank holds an equal slice of a multiple of `divisible_by`
    (TP: the running one unless given)."""
    tp = tensor_model_parallel_size or (parallel_state.get_tensor_model_parallel_world_size()
                                        if parallel_state.model_parallel_is_initialized() else 1)
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def replicated_norm(config: TransformerConfig, width: int, eps: float) -> torch.nn.Module:
    """A norm outside the block: it sees the whole sequence, so its gradients need no TP all-reduce."""
    norm = build_norm(config, width, eps=eps)
    for param in norm.parameters():
        param.sequence_parallel = False
    return norm
