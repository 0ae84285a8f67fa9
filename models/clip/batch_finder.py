"""`batch_finder.enabled`: the largest micro-batch a CLIP run fits, before training starts.

Candidates are the divisors of global_batch_size / DP up to `max_micro_batch` that leave at least
PP micro-batches per step, so gradient accumulation still divides and fills the pipeline. Each trial runs one real forward and backward of this rank's stage
(through the pipeline schedule under PP, with the teacher's forward when there is one) on a
synthetic batch of that size, with the plain contrastive loss (FastCLIP's state is not touched);
every rank agrees on each verdict, so they all try the same sizes and keep the same answer.

- GPU: a size fits when it runs without out-of-memory (or, with `memory_budget_gb`, when the
  allocator's peak stays within it).
- CPU: a size fits when parameters, gradients and Adam state (fp32 moments) plus the activations
  the forward saves for backward stay within `memory_budget_gb` (required: there is no
  out-of-memory to catch, only swapping).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from engine.config import ConfigError
from engine.schedules import forward_backward
from models.clip.loss import ContrastiveLoss
from models.common.finetune_utils import (
    cuda_oom_probe,
    cuda_peak_bytes,
    divisors,
    find_micro_batch_size,
    memory_budget_probe,
    saved_activation_bytes,
)

log = logging.getLogger("engine")


class _NoGradientSync:
    """The schedule's optimizer hook during a trial: nothing to overlap."""

    def prepare_backward(self, last_micro_batch: bool) -> None:
        pass


def fixed_state_bytes(model: torch.nn.Module) -> int:
    """Parameters, plus gradients and two fp32 Adam moments for the trainable ones."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        if p.requires_grad:
            total += p.numel() * (p.element_size() + 8)
    return total


def synthetic_batch(model_cfg, batch_size: int, vocab_size: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    v, t = model_cfg.vision, model_cfg.text
    images = torch.randn(batch_size, v.num_channels, v.img_h, v.img_w, generator=gen)
    tokens = torch.randint(1, max(2, vocab_size - 1), (batch_size, t.encoder_seq_length), generator=gen)
    # end of text at the last position: the longest a real batch can be, also for a trimmed text tower
    tokens[:, -1] = vocab_size - 1 if t.eot_token_id < 0 else t.eot_token_id
    return {"images": images, "tokens": tokens}


def find_clip_micro_batch(cfg, ctx, model, forward_step, link, precision, vocab_size: int, reads_data: bool) -> int:
    """Collective: the micro-batch to train with (see the module docstring). `forward_step(loss_fn)`
    builds this run's forward step around a given loss."""
    finder = cfg.batch_finder
    per_replica = cfg.trainer.global_batch_size // ctx.dims.dp
    limit = finder.max_micro_batch or per_replica
    # Accumulation must divide, and fill the pipeline (at least PP micro-batches per step).
    candidates = [d for d in divisors(per_replica) if d <= limit and per_replica // d >= ctx.dims.pp]
    budget = None if finder.memory_budget_gb is None else int(finder.memory_budget_gb * 2**30)
    if ctx.device.type != "cuda" and budget is None:
        raise ConfigError("batch_finder.enabled on CPU needs batch_finder.memory_budget_gb (there is no "
                          "out-of-memory to catch)")
    step_fn = forward_step(ContrastiveLoss(cfg.model.local_loss, cfg.model.gather_with_grad, group=ctx.dp_group))
    autocast = (lambda: precision.autocast(ctx.device)) if precision is not None else None

    def trial(size: int) -> None:
        batch = synthetic_batch(cfg.model, size, vocab_size)
        try:
            forward_backward(model=model, forward_step=step_fn, data_iter=iter([batch]), num_micro_batches=1,
                             link=link, optimizer=_NoGradientSync(), autocast=autocast, reads_data=reads_data)
        finally:
            model.zero_grad(set_to_none=True)

    if ctx.device.type == "cuda":
        fits = cuda_oom_probe(trial) if budget is None else memory_budget_probe(cuda_peak_bytes(trial), budget)
    else:
        fits = memory_budget_probe(saved_activation_bytes(trial), budget, fixed_bytes=fixed_state_bytes(model))
    group = dist.group.WORLD if dist.is_initialized() else None
    size = find_micro_batch_size(fits, candidates=candidates, group=group)
    log.info("batch finder: micro-batch %d (of %s), accumulation %d", size, candidates, per_replica // size)
    return size

