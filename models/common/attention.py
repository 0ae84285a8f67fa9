"""Core-attention modules for megatron-core's `SelfAttention`, chosen by config.

megatron-core's own `DotProductAttention` hard-codes CUDA (a global memory buffer and the default
causal mask), so the default here is torch's `scaled_dot_product_attention`: on CPU it runs the math
kernel, on GPU it dispatches to the flash or memory-efficient kernel, so one spec serves both.
flash-attn and Transformer Engine are optional extras; asking for one that is not installed falls
back to SDPA with a logged warning, and the backend that runs is logged once at start-up.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from models.common.kv_cache import active_kv_cache

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "flash", "te")


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_attention_backend(requested: str, use_flash_attention: bool = False) -> str:
    """Map the config's request onto a backend that can run here.

    `use_flash_attention: true` (the NeMo key) asks for flash-attn; without it installed, SDPA runs,
    which on GPU picks its own flash kernel.
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend={requested!r} is not one of {', '.join(ATTENTION_BACKENDS)}"
        )
    if use_flash_attention and requested == "sdpa":
        requested = "flash"
    if requested == "flash" and not flash_attn_available():
        log.warning("flash-attn requested but not installed or no GPU: using torch SDPA instead")
        return "sdpa"
    if requested == "te" and not transformer_engine_available():
        log.warning("Transformer Engine requested but not installed or no GPU: using torch SDPA")
        return "sdpa"
    return requested


_announced: set[str] = set()


def announce_attention_backend(backend: str, device: torch.device) -> None:
    """Say once per process which attention kernel runs (the guide asks for it at start-up)."""
    key = f"{backend}:{device.type}"
    if key in _announced:
        return
    _announced.add(key)
    detail = {
        "sdpa": "torch scaled_dot_product_attention"
        + (" (flash / memory-efficient kernels on GPU)" if device.type == "cuda" else " (math kernel on CPU)"),
        "flash": "flash-attn flash_attn_func",
        "te": "Transformer Engine DotProductAttention",
    }[backend]
    log.info("attention backend: %s", detail)


class _CoreAttentionBase(MegatronModule):
    """Shared constructor: the interface megatron-core's `SelfAttention` builds core attention with."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine attention (attention_backend=te)")
        tp_size = pg_collection.tp.size() if pg_collection is not None else (
            parallel_state.get_tensor_model_parallel_world_size()
        )
        if config.num_attention_heads % tp_size:
            raise ValueError(
                f"num_attention_heads={config.num_attention_heads} is not divisible by "
                f"tensor_model_parallel_size={tp_size}"
            )
        self.attn_mask_type = attn_mask_type
        self.layer_number = layer_number
        self.heads_per_partition = config.num_attention_heads // tp_size
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _is_causal(self, attn_mask_type: Optional[AttnMaskType]) -> bool:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return mask_type == AttnMaskType.causal

    def _check_unsupported(self, attention_bias, packed_seq_params) -> None:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError(
                "attention bias and packed sequences need Transformer Engine attention (attention_backend=te)"
            )


class SDPAttention(_CoreAttentionBase):
    """torch SDPA core attention. Inputs are megatron's [s, b, heads, head_dim]; output [s, b, h].

    `attention_mask`: None (the spec's mask type: causal or none) or megatron's boolean mask
    (True = masked) broadcastable to [b, heads, s_q, s_k], or an additive float mask. While a
    `KVCache` is active, this step's keys and values are appended to it and the queries attend over
    every cached position (the caller's mask then spans them all).
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        self._check_unsupported(attention_bias, packed_seq_params)
        seq, batch = query.shape[0], query.shape[1]
        cache = active_kv_cache()
        if cache is not None:
            key, value = cache.update(self.layer_number, key, value)
            if attention_mask is None and 1 < seq < key.shape[0] and self._is_causal(attn_mask_type):
                raise ValueError("several new positions after a cached prefix need an explicit attention mask")
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat kv heads
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        is_causal = self._is_causal(attn_mask_type) and attention_mask is None and seq == k.shape[2]
        mask = None
        if attention_mask is not None:
            # megatron masks mark positions to drop with True; SDPA's boolean masks mark ones to keep.
            mask = ~attention_mask if attention_mask.dtype == torch.bool else attention_mask
        dropout_p = self.dropout_p if self.training else 0.0
        # Heads are split over TP ranks, so attention dropout draws from the model-parallel RNG
        # stream (different per TP rank, identical across DP replicas), as megatron-core does.
        with get_cuda_rng_tracker().fork():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale
            )
        # [b, n, s, d] -> [s, b, n*d]
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)


class FlashAttention(_CoreAttentionBase):
    """flash-attn core attention (GPU, fp16/bf16 only)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        from flash_attn import flash_attn_func

        self._check_unsupported(attention_bias, packed_seq_params)
        if active_kv_cache() is not None:
            raise NotImplementedError("generation with a KV cache runs on attention_backend=sdpa (the same weights)")
        if attention_mask is not None:
            raise NotImplementedError("flash-attn takes no explicit attention mask: use causal or no mask")
        seq, batch = query.shape[0], query.shape[1]
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, n, d]
        dropout_p = self.dropout_p if self.training else 0.0
        with get_cuda_rng_tracker().fork():
            out = flash_attn_func(
                q, k, v, dropout_p=dropout_p, softmax_scale=self.softmax_scale,
                causal=self._is_causal(attn_mask_type),
            )
        return out.transpose(0, 1).reshape(seq, batch, -1)


def core_attention_module(backend: str) -> type:
    """The class a layer spec puts in `SelfAttentionSubmodules.core_attention`."""
    if backend == "sdpa":
        return SDPAttention
    if backend == "flash":
        return FlashAttention
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    raise ValueError(f"unknown attention backend {backend!r}")
