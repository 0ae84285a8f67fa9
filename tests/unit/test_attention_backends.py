"""Core-attention backends against the math definition softmax(QK^T / sqrt(d)) V.

Tolerances by dtype: fp32 1e-5; bf16 2e-2 (8 mantissa bits, softmax over 16 keys).
flash-attn and Transformer Engine need a GPU: those cases skip on CPU and say why.
"""
import logging
import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from models.common.attention import (FlashAttention, SDPAttention, flash_attn_available,
                                     resolve_attention_backend)
from models.common.transformer_config import make_transformer_config

SEQ, BATCH, HEADS, DIM = 16, 3, 4, 8
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def math_attention(q, k, v, causal: bool):
    """Reference on [s, b, n, d] inputs, computed in fp64."""
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], -1)


def _inputs(dtype, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(SEQ, BATCH, HEADS, DIM, generator=gen).to(device, dtype) for _ in range(3)]


def _module(cls, causal):
    config = make_transformer_config(num_layers=1, hidden_size=HEADS * DIM, ffn_hidden_size=4 * HEADS * DIM,
                                     num_attention_heads=HEADS, tensor_model_parallel_size=1,
                                     pipeline_model_parallel_size=1)
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    return cls(config, layer_number=1, attn_mask_type=mask, attention_type="self")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_math(single_rank, dtype, causal):
    q, k, v = _inputs(dtype)
    out = _module(SDPAttention, causal)(q, k, v, attention_mask=None)
    ref = math_attention(q, k, v, causal)
    assert out.shape == (SEQ, BATCH, HEADS * DIM) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_matches_math(single_rank, causal):
    if not flash_attn_available():
        pytest.skip("flash-attn is not installed or no CUDA device: GPU-only check")
    q, k, v = _inputs(torch.bfloat16, "cuda")
    out = _module(FlashAttention, causal).cuda()(q, k, v, attention_mask=None)
    torch.testing.assert_close(out.double().cpu(), math_attention(q.cpu(), k.cpu(), v.cpu(), causal),
                               atol=TOLERANCE[torch.bfloat16], rtol=0)


def test_fallbacks_are_logged(caplog):
    with caplog.at_level(logging.WARNING):
        if not flash_attn_available():
            assert resolve_attention_backend("sdpa", use_flash_attention=True) == "sdpa"
            assert "flash-attn requested but not installed" in caplog.text
    assert resolve_attention_backend("sdpa") == "sdpa"
    with pytest.raises(ValueError, match="not one of sdpa, flash, te"):
        resolve_attention_backend("xformers")
