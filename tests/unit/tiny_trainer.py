"""A one-process `Trainer` with a real `CheckpointManager` around a 4x4 linear model, for tests of
the step loop's fault paths (non-finite losses, failing evaluation, resume) that need no model
family: each step is one micro-batch of fixed random data and a squared-output loss."""
from __future__ import annotations

import torch

from engine.checkpoint import CheckpointManager
from engine.optim import WarmupCosineSchedule, build_optimizer
from engine.schema import ExperimentConfig
from engine.trainer import Trainer


def tiny_config(out_dir: str, *, max_steps: int = 6, save_interval: int = 2, keep_last: int = 3,
                resume: str = "auto", load_optimizer: bool = True) -> ExperimentConfig:
    cfg = ExperimentConfig()
    t = cfg.trainer
    t.max_steps, t.micro_batch_size, t.global_batch_size = max_steps, 2, 2
    t.log_every_n_steps, t.val_check_interval, t.output_dir = 1, 0, out_dir
    cfg.optim.lr, cfg.optim.sched.warmup_steps = 1e-2, 1
    ck = cfg.checkpoint
    ck.save_interval, ck.keep_last, ck.resume, ck.load_optimizer = save_interval, keep_last, resume, load_optimizer
    return cfg


def tiny_trainer(cfg: ExperimentConfig, ctx, *, eval_fn=None, nan_from_step: int | None = None):
    """(trainer, data iterator); from step `nan_from_step` on (1-based) the loss is NaN."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, cfg.optim, dp_group=ctx.dp_group, model_parallel_group=ctx.model_parallel_group,
                                max_grad_norm=cfg.trainer.gradient_clip_val)
    scheduler = WarmupCosineSchedule(optimizer, cfg.optim.lr, cfg.optim.sched.warmup_steps, cfg.trainer.max_steps,
                                     cfg.optim.sched.min_lr, cfg.optim.sched.name)
    trainer = None

    def forward_step(model, batch, inputs=None):
        loss = model(batch).square().mean()
        if nan_from_step is not None and trainer.state.step + 1 >= nan_from_step:
            loss = loss * float("nan")
        return loss, {"samples": batch.shape[0], "tokens": batch.numel()}

    gen = torch.Generator().manual_seed(1)
    data = iter(lambda: torch.randn(2, 4, generator=gen), None)
    trainer = Trainer(cfg.trainer, ctx, model, optimizer, scheduler, forward_step, eval_fn=eval_fn, train_loader=data,
                      checkpoint=CheckpointManager(cfg, ctx, install_signals=False))
    return trainer, data
