"""AdamW with CLIP's weight-decay exclusions, and a warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch

# Parameters that should not be decayed (open_clip / CLIP practice): gains and biases of norms,
# all biases, embeddings and learned positions, class tokens, and the temperature.
_NO_DECAY_NAME_PARTS = ("embedding", "class_embedding", "logit_scale", "norm", "ln_")


def exclude_from_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim < 2 or any(part in name for part in _NO_DECAY_NAME_PARTS)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if exclude_from_weight_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """`cfg` is an `OptimConfig`. More optimizer names (distributed_fused_adam) come with ZeRO."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name in ("adamw", "adam"):
        decoupled = cfg.name == "adamw"
        opt_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        return opt_cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    raise ValueError(f"optim.name={cfg.name!r} is not available; use adamw or adam")


class WarmupCosineSchedule:
    """Linear warmup from 0 to `max_lr`, then cosine decay to `min_lr` at `max_steps`."""

    def __init__(self, optimizer, max_lr: float, warmup_steps: int, max_steps: int,
                 min_lr: float = 0.0, name: str = "cosine"):
        if name not in ("cosine", "constant"):
            raise ValueError(f"optim.sched.name={name!r}: use cosine or constant")
        self.optimizer, self.max_lr, self.min_lr = optimizer, max_lr, min_lr
        self.warmup_steps, self.max_steps, self.name = warmup_steps, max_steps, name
        self.step_count = 0
        self._apply(self.lr_at(0))

    def lr_at(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        if self.name == "constant":
            return self.max_lr
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.max_lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def _apply(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.step_count += 1
        self._apply(self.lr_at(self.step_count))

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self._apply(self.lr_at(self.step_count))
