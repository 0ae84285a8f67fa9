"""3D rotary position embedding over (token type or time, row, column), in megatron-core's layout.

megatron-core's `MultimodalRotaryEmbedding` (Qwen2-VL's mRoPE) lays the rotation out: `sections`
gives each axis its share of the head's frequencies (the first `sections[0]` rotate by the
type/time index, the next `sections[1]` by the row, the last by the column), repeated for both
halves of the head in the rotate-half layout that megatron's `apply_rotary_pos_emb` applies
inside `SelfAttention` (the model passes the result to the block as `rotary_pos_emb`). Being a
rotation per frequency pair, it keeps norms, and q.k depends only on the difference of the two
positions (tests/unit/test_dit_rope.py).

The frequencies themselves: `shared` is megatron's (one geometric range over the whole head, cut
into sections: the column axis gets only the slowest frequencies, which barely turn over a 16 x 16
grid); `per_axis` (the default) gives every axis a full geometric range of its own size, as
Lumina-Next's and Flux's 3D RoPE, fed through the same megatron forward pass.

megatron's constructor places its frequencies on `torch.cuda.current_device()`, so this subclass
builds them on the CPU and moves them to the positions' device; the forward pass is megatron's.
"""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import (
    MultimodalRotaryEmbedding,
)


def default_sections(head_dim: int) -> list[int]:
    """head_dim / 2 frequencies split 1/4 (type/time), 3/8 (row), 3/8 (column), as Lumina-Next's
    16/24/24 axes of a 64-wide head."""
    half = head_dim // 2
    time = half // 4
    row = (half - time) // 2
    return [time, row, half - time - row]


FREQUENCIES = ("per_axis", "shared")


def inverse_frequencies(head_dim: int, sections: list[int], base: float, kind: str = "per_axis") -> torch.Tensor:
    """[head_dim / 2] inverse frequencies, section by section (see the module docstring)."""
    if kind == "shared":
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if kind != "per_axis":
        raise ValueError(f"rope frequencies {kind!r}: use one of {', '.join(FREQUENCIES)}")
    parts = [1.0 / (base ** (torch.arange(0, 2 * n, 2, dtype=torch.float32) / (2 * n))) for n in sections if n]
    return torch.cat(parts)


class Rotary3D(MultimodalRotaryEmbedding):
    def __init__(self, head_dim: int, sections: list[int] | None = None, base: float = 10000.0,
                 frequencies: str = "per_axis"):
        torch.nn.Module.__init__(self)  # megatron's __init__ asks CUDA for a device; the state is the same
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head size, got {head_dim}")
        self.sections = list(sections) if sections is not None else default_sections(head_dim)
        if len(self.sections) != 3 or sum(self.sections) != head_dim // 2:
            raise ValueError(f"rope sections {self.sections} must be three counts summing to head_dim/2 = {head_dim // 2}")
        self.rotary_interleaved = False  # rotate-half, as megatron's apply_rotary_pos_emb expects by default
        self.seq_len_interpolation_factor = None
        self.cp_group = None
        self.inv_freq = inverse_frequencies(head_dim, self.sections, base, frequencies)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [3, b, s] (type/time, row, column) -> rotary_pos_emb [s, b, 1, head_dim] (fp32)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        return super().forward(positions, self.sections)


def grid_positions(rows: int, cols: int, token_type: int = 0) -> torch.Tensor:
    """[3, rows * cols] positions of a row-major patch grid: (token_type, row, column)."""
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    return torch.stack([torch.full_like(r, token_type), r, c])


def sequence_positions(rows: int, cols: int, layout: str, padding: int = 0) -> torch.Tensor:
    """Positions [3, 1, s] of the DiT's token sequence: the conditioning grid (type 0) and, with
    the concat layout, the noisy vector's copies on the same grid (type 1); `padding` zero
    positions at the end (sequence-parallel padding, masked in attention)."""
    parts = [grid_positions(rows, cols, 0)]
    if layout == "concat":
        parts.append(grid_positions(rows, cols, 1))
    if padding:
        parts.append(torch.zeros(3, padding, dtype=torch.long))
    return torch.cat(parts, dim=1).unsqueeze(1)
