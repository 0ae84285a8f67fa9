"""Console progress lines and TensorBoard scalars, written by the logging rank only."""
from __future__ import annotations

import logging
import time

from engine.throughput import describe

log = logging.getLogger("engine")


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rem = divmod(seconds, 3600)
    minutes, secs = divmod(rem, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressLogger:
    def __init__(self, max_steps: int, tensorboard_dir: str | None, enabled: bool):
        self.max_steps = max_steps
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        self.start = time.time()

    def log_train(self, step: int, metrics: dict) -> None:
        """`metrics` holds loss, lr, grad_norm, samples_per_s, tokens_per_s, step_time (s), and may hold
        TFLOP/s, MFU and peak memory (`engine.throughput`)."""
        if not self.enabled:
            return
        remaining = (self.max_steps - step) * metrics["step_time"]
        log.info(
            "step %d/%d | loss %.4f | lr %.3e | grad_norm %.3f | %.1f samples/s | %.0f tokens/s | "
            "%.3f s/step | elapsed %s | ETA %s%s",
            step, self.max_steps, metrics["loss"], metrics["lr"], metrics["grad_norm"],
            metrics["samples_per_s"], metrics["tokens_per_s"], metrics["step_time"],
            format_duration(time.time() - self.start), format_duration(remaining), describe(metrics),
        )
        if "pipeline_bubble" in metrics:
            log.info("step %d/%d | pipeline bubble %.3f (idle share of the 1F1B schedule, mean over stages)",
                     step, self.max_steps, metrics["pipeline_bubble"])
        self.scalars("train", step, metrics)

    def log_eval(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        log.info("eval at step %d | %s", step, " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        self.scalars("eval", step, metrics)

    def scalars(self, prefix: str, step: int, metrics: dict) -> None:
        if self.writer is None:
            return
        for key, value in metrics.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
