"""Megatron sequence parallelism around a block: scatter the block input over the TP ranks along the
sequence, gather it back for what follows (pooling, a replicated head)."""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceParallelRegion:
    """Scatter the block input over TP ranks along the sequence and gather it back (Megatron SP).

    The sequence is padded with zeros to a multiple of TP. A causal model ignores the padding
    (it comes last); a bidirectional one masks the padded keys (`key_padding_mask`).
    """

    def __init__(self, config: TransformerConfig):
        self.enabled = bool(config.sequence_parallel) and parallel_state.get_tensor_model_parallel_world_size() > 1
        self.tp = parallel_state.get_tensor_model_parallel_world_size() if self.enabled else 1

    def padding(self, seq_len: int) -> int:
        return (-seq_len) % self.tp

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, h] -> this rank's [s_padded / TP, b, h] (identity without SP)."""
        if not self.enabled:
            return x
        pad = self.padding(x.shape[0])
        if pad:
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
        return scatter_to_sequence_parallel_region(x)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The whole (padded) sequence on every TP rank; backward keeps this rank's slice of the
        gradient, since what follows (pooling, projection) is replicated."""
        if not self.enabled:
            return x
        return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)

    def key_padding_mask(self, seq_len: int, batch: int, device) -> torch.Tensor | None:
        """megatron-style boolean mask (True = masked) hiding padded keys, or None without padding."""
        pad = self.padding(seq_len) if self.enabled else 0
        if not pad:
            return None
        mask = torch.zeros(batch, 1, 1, seq_len + pad, dtype=torch.bool, device=device)
        mask[..., seq_len:] = True
        return mask
