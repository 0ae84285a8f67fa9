"""Next-token cross entropy over vocab-parallel logits (megatron's `vocab_parallel_cross_entropy`),
with a loss mask.

The logits stay split over TP ranks along the vocabulary: each rank holds [s, b, V_pad / TP] and the
softmax statistics are all-reduced over TP inside megatron's function, so the full [s, b, V] logits
are never built. Rows past the true vocabulary (Megatron's padding to a multiple of
make_vocab_size_divisible_by x TP) are masked out of the softmax: no label can name them, so the
loss is the one over the true vocabulary (equal to Hugging Face's on an imported model).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def mask_vocab_padding(vocab_parallel_logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """-inf on this TP rank's columns at or past `vocab_size` (unchanged when it holds none)."""
    if vocab_size is None:
        return vocab_parallel_logits
    local = vocab_parallel_logits.shape[-1]
    rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    first_pad = vocab_size - rank * local
    if first_pad >= local:
        return vocab_parallel_logits
    columns = torch.arange(local, device=vocab_parallel_logits.device)
    return vocab_parallel_logits.masked_fill(columns >= max(first_pad, 0), float("-inf"))


def token_losses(vocab_parallel_logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Per-token cross entropy [b, s] (fp32) from logits [s, b, V_pad / TP] and labels [b, s]."""
    if labels.min() < 0 or (vocab_size is not None and labels.max() >= vocab_size):
        raise ValueError(f"labels must lie in [0, {vocab_size}) (got {int(labels.min())}..{int(labels.max())}); "
                         "mask positions out with loss_mask instead of a negative label")
    # float(): the softmax statistics in fp32 under bf16/fp16 (megatron subtracts the max in place,
    # so the float copy also keeps the caller's logits intact).
    logits = mask_vocab_padding(vocab_parallel_logits.float(), vocab_size)
    if logits is vocab_parallel_logits:
        logits = logits.clone()
    return vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous()).transpose(0, 1)


def masked_mean_loss(vocab_parallel_logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                     vocab_size: int | None = None) -> torch.Tensor:
    """Mean cross entropy over the positions where `loss_mask` [b, s] is non-zero (every position
    without a mask), as Megatron's GPT loss per micro-batch. A micro-batch with nothing to predict
    gives 0 (with gradients of 0), not NaN."""
    losses = token_losses(vocab_parallel_logits, labels, vocab_size)
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)
