"""A step-based training loop that any model family plugs into through `forward_step`.

`forward_step(model, batch) -> (loss, {"samples": n, "tokens": n})` is the only model-specific
piece; gradient accumulation, DP averaging, clipping, the optimizer and schedule, non-finite
steps, logging and evaluation are the same for CLIP, the DiT and the VLM.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.grad_norm import clip_grad_norm
from engine.progress import ProgressLogger
from parallel.data_parallel import GradientAverager

log = logging.getLogger("engine")

MAX_CONSECUTIVE_SKIPS = 10  # non-finite steps in a row before training stops with an error


def accumulation_steps(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    per_pass = micro_batch_size * dp_size
    if global_batch_size % per_pass:
        raise ValueError(
            f"trainer.global_batch_size={global_batch_size} is not divisible by trainer.micro_batch_size="
            f"{micro_batch_size} x data-parallel size {dp_size} = {per_pass}"
        )
    return global_batch_size // per_pass


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    history: list = field(default_factory=list)  # (step, loss) of every logged step


class Trainer:
    def __init__(self, cfg, ctx, model, optimizer, scheduler, forward_step, eval_fn=None):
        """`cfg` is a `TrainerConfig`; `ctx` the `ParallelContext`; `eval_fn(step) -> metrics`."""
        self.cfg, self.ctx, self.model = cfg, ctx, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.forward_step, self.eval_fn = forward_step, eval_fn
        self.accum = accumulation_steps(cfg.global_batch_size, cfg.micro_batch_size, ctx.dims.dp)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grad_averager = GradientAverager(self.params, ctx.dp_group)
        self.state = TrainState()
        self.progress = ProgressLogger(cfg.max_steps, f"{cfg.output_dir}/tensorboard", ctx.is_logging_rank)

    def train_step(self, data_iter) -> dict:
        """One optimizer step over `accum` micro-batches; returns the step's metrics."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.ctx.device)
        samples = tokens = 0
        for _ in range(self.accum):
            batch = next(data_iter)
            loss, info = self.forward_step(self.model, batch)
            (loss / self.accum).backward()
            loss_sum += loss.detach().float()
            samples += info["samples"]
            tokens += info["tokens"]
        self.grad_averager.average()
        grad_norm = clip_grad_norm(self.params, self.cfg.gradient_clip_val)
        # The norm was reduced over every model-parallel rank and gradients over DP, so every rank
        # takes the same decision here and no collective is left unmatched.
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            self.state.skipped_steps = 0
        else:
            self._skip_nonfinite(grad_norm)
        self.scheduler.step()
        mean_loss = loss_sum / self.accum
        dist.all_reduce(mean_loss, group=self.ctx.dp_group)
        dp = self.ctx.dims.dp
        return {"loss": mean_loss.item() / dp, "grad_norm": grad_norm.item(), "lr": self.scheduler.lr,
                "samples": samples * dp, "tokens": tokens * dp}

    def _skip_nonfinite(self, grad_norm) -> None:
        self.state.skipped_steps += 1
        log.warning("step %d: gradient norm is %s; update skipped (%d in a row)",
                    self.state.step + 1, grad_norm.item(), self.state.skipped_steps)
        if self.state.skipped_steps >= MAX_CONSECUTIVE_SKIPS:
            raise FloatingPointError(
                f"{MAX_CONSECUTIVE_SKIPS} consecutive steps had non-finite gradients (last at step "
                f"{self.state.step + 1}); lower optim.lr or check the data"
            )

    def fit(self, data_iter) -> dict:
        """Train to `max_steps`, evaluating every `val_check_interval` steps and at the end."""
        cfg, last_eval = self.cfg, {}
        log.info("training %d steps: global batch %d = micro %d x DP %d x accumulation %d",
                 cfg.max_steps, cfg.global_batch_size, cfg.micro_batch_size, self.ctx.dims.dp, self.accum)
        window_start, window_samples, window_tokens = time.time(), 0, 0
        while self.state.step < cfg.max_steps:
            metrics = self.train_step(data_iter)
            self.state.step += 1
            self.state.samples_seen += metrics["samples"]
            window_samples += metrics["samples"]
            window_tokens += metrics["tokens"]
            step = self.state.step
            if step % cfg.log_every_n_steps == 0 or step == cfg.max_steps:
                elapsed = time.time() - window_start
                steps_in_window = (step - 1) % cfg.log_every_n_steps + 1
                metrics.update(samples_per_s=window_samples / elapsed, tokens_per_s=window_tokens / elapsed,
                               step_time=elapsed / steps_in_window)
                self.state.history.append((step, metrics["loss"]))
                self.progress.log_train(step, metrics)
                window_start, window_samples, window_tokens = time.time(), 0, 0
            at_interval = cfg.val_check_interval > 0 and step % cfg.val_check_interval == 0
            if self.eval_fn is not None and (at_interval or step == cfg.max_steps):
                last_eval = self.eval_fn(step)
                self.progress.log_eval(step, last_eval)
                window_start = time.time()  # evaluation time is not training throughput
        self.progress.close()
        return last_eval
