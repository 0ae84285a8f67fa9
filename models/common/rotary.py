"""Rotary position embeddings (RoPE) for megatron-core's `SelfAttention`, with Llama-3 frequency
scaling and per-row positions.

megatron-core's `RotaryEmbedding` moves its frequencies to `torch.cuda.current_device()` on first
use and fixes Llama-3's scaling band (low 1, high 4, original context 8192); this one is
device-agnostic, takes every scaling parameter from the config, and takes position ids, so a
left-padded batch can start each row at position 0 (as Hugging Face's generate does). The output
is what megatron's attention applies with `apply_rotary_pos_emb`: angles [s, b or 1, 1, rot_dim]
in fp32, non-interleaved halves (Hugging Face / NeMo layout) unless `rotary_interleaved`.
"""
from __future__ import annotations

import math

import torch


def rope_inverse_frequencies(rot_dim: int, base: float) -> torch.Tensor:
    """1 / base^(2i / d) for i < d / 2, in fp32."""
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))


def llama3_scaled_frequencies(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                              high_freq_factor: float, original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1's long-context rule: long wavelengths (beyond the original context / low_freq_factor)
    are slowed by `factor`, short ones (below original / high_freq_factor) kept, and the band
    between blends the two linearly in original_context / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    low_limit = original_max_position_embeddings / low_freq_factor  # longer wavelengths: scaled
    high_limit = original_max_position_embeddings / high_freq_factor  # shorter wavelengths: kept
    smooth = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelength > low_limit, inv_freq / factor, inv_freq)
    in_band = (wavelength <= low_limit) & (wavelength >= high_limit)
    return torch.where(in_band, blended, out)


class RotaryEmbedding(torch.nn.Module):
    """Angles for positions; no parameters (the frequencies are a non-persistent buffer, so state
    dicts do not carry them and `.to(device)` moves them)."""

    def __init__(self, head_dim: int, base: float = 10000.0, rotary_percent: float = 1.0,
                 rotary_interleaved: bool = False, scaling: dict | None = None):
        super().__init__()
        rot_dim = int(head_dim * rotary_percent)
        if rot_dim % 2:
            raise ValueError(f"rotary dimension {rot_dim} (head_dim {head_dim} x rotary_percent {rotary_percent}) "
                             "must be even")
        inv_freq = rope_inverse_frequencies(rot_dim, base)
        if scaling:
            inv_freq = llama3_scaled_frequencies(inv_freq, **scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rotary_interleaved = rotary_interleaved

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids [s] (every row) or [b, s] -> angles [s, 1 or b, 1, rot_dim] (fp32)."""
        positions = position_ids.to(self.inv_freq.device, torch.float32)
        if positions.dim() == 1:
            positions = positions[None]
        freqs = positions.transpose(0, 1)[..., None] * self.inv_freq  # [s, b, rot_dim / 2]
        if self.rotary_interleaved:
            angles = torch.stack([freqs, freqs], dim=-1).flatten(-2)
        else:
            angles = torch.cat([freqs, freqs], dim=-1)
        return angles[:, :, None, :]
