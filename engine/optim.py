"""AdamW with the model's own weight-decay policy, and a warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.optim.optimizer import _get_scalar_dtype

from engine.distributed_optimizer import FlatAdamW, StepResult
from engine.grad_norm import clip_grad_norm
from engine.loss_scaler import ConstantLossScaler
from engine.schema import OPTIMIZERS  # one list of names, checked when the config loads
from parallel.data_parallel import GradientAverager
from parallel.sequence_parallel import allreduce_sequence_parallel_grads


def default_no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Without a model policy: biases and norm gains (every parameter of fewer than 2 dims) are not
    decayed, matrices are (nanoGPT's and Megatron's default)."""
    return param.ndim < 2


def no_weight_decay_policy(model: torch.nn.Module):
    """The model's own `no_weight_decay(name, param) -> bool` (the model owns its policy, as
    nanoGPT's `configure_optimizers`), else `default_no_weight_decay`."""
    hook = getattr(model, "no_weight_decay", None)
    return hook if callable(hook) else default_no_weight_decay


@dataclass(frozen=True)
class ParamGroup:
    """How the optimizer treats a set of parameters. A model's `param_group(name, param) ->
    ParamGroup` hook decides (groups are told apart by name); without one, `no_weight_decay` splits
    the parameters into "decay" and "no_decay"."""

    name: str
    weight_decay: bool = True
    # (optimizer step, the schedule's lr) -> this group's lr; None: the schedule's lr. E.g. FastCLIP's
    # temperature with its own lr_tau and schedule.
    lr: Optional[Callable[[int, float], float]] = None


DECAY, NO_DECAY = ParamGroup("decay"), ParamGroup("no_decay", weight_decay=False)


def param_group_policy(model: torch.nn.Module) -> Callable[[str, torch.nn.Parameter], ParamGroup]:
    hook = getattr(model, "param_group", None)
    if callable(hook):
        return hook
    exclude = no_weight_decay_policy(model)
    return lambda name, param: NO_DECAY if exclude(name, param) else DECAY


def group_parameters(model: torch.nn.Module) -> list[tuple[ParamGroup, list]]:
    """[(group, [(name, trainable parameter), ...])] in first-seen order; frozen parameters
    (requires_grad=False) belong to no group: no optimizer state, no gradient buffer."""
    policy, groups = param_group_policy(model), {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = policy(name, param)
        if group.name in groups and groups[group.name][0] != group:
            raise ValueError(f"parameter group {group.name!r} is given two different settings (at {name})")
        groups.setdefault(group.name, (group, []))[1].append((name, param))
    return list(groups.values())


def param_groups(model: torch.nn.Module, weight_decay: float, groups=None) -> list[dict]:
    """torch optimizer param groups, one per `ParamGroup` (of `groups`, default the model's)."""
    return [{"params": [p for _, p in members], "weight_decay": weight_decay if group.weight_decay else 0.0,
             "name": group.name} for group, members in (groups or group_parameters(model))]




class ReplicatedAdamW:
    """torch's Adam/AdamW on the model's own (fp32) parameters, replicated on every DP rank:
    gradients are averaged over DP, clipped by the global norm, then stepped."""

    def __init__(self, model: torch.nn.Module, cfg, dp_group, max_grad_norm: float, loss_scaler=None):
        opt_cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        self.params = [p for p in model.parameters() if p.requires_grad]
        # torch's fused kernel (CPU and CUDA) reads and writes each element once; its default on
        # CPU is a per-tensor loop of ~7 elementwise passes (3.6x slower for B/32 on one core).
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in self.params)
        groups = group_parameters(model)
        self.optimizer = opt_cls(param_groups(model, cfg.weight_decay, groups), lr=cfg.lr, betas=tuple(cfg.betas),
                                 eps=cfg.eps, fused=fused or None)
        self.param_groups = self.optimizer.param_groups
        self.lr_fns = [group.lr for group, _ in groups]  # beside torch's groups (their state_dict pickles)
        self.averager = GradientAverager(self.params, dp_group)
        self.max_grad_norm = max_grad_norm
        self.loss_scaler = loss_scaler or ConstantLossScaler()

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale

    def set_lr(self, step: int, lr: float) -> None:
        """The schedule's `lr` for optimizer step `step`; groups with their own lr rule apply it."""
        for group, fn in zip(self.param_groups, self.lr_fns):
            group["lr"] = fn(step, lr) if fn is not None else lr

    def zero_grad(self) -> None:
        self.averager.zero_grad()  # with DP, gradients live in the averager's buckets

    def prepare_backward(self, last_micro_batch: bool) -> None:
        """The last micro-batch's backward all-reduces gradient buckets as they complete."""
        self.averager.prepare_backward(last_micro_batch)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for state in self.optimizer.state.values()
                   for t in state.values() if torch.is_tensor(t) and t.dim() > 0)

    def step(self) -> StepResult:
        self.averager.average()
        allreduce_sequence_parallel_grads(self.params)
        if self.loss_scale != 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(1.0 / self.loss_scale)
        # The norm is reduced over every model-parallel rank and gradients over DP, so every rank
        # takes the same skip decision and no collective is left unmatched.
        norm = clip_grad_norm(self.params, self.max_grad_norm)
        skipped = not bool(torch.isfinite(norm))
        self.loss_scaler.update(skipped)
        if not skipped:
            self.optimizer.step()
        return StepResult(norm.item(), skipped)

    # -- checkpoint state (engine/checkpoint): per-parameter views, the same form as FlatAdamW's ----
    def checkpoint_slices(self) -> list:
        """[(param, 0, {"exp_avg", "exp_avg_sq": 1-d views})] for every parameter. Before the first
        step the state is created as torch's first step would (zeros, step 0), so it can be loaded into."""
        out = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state[p]
                if not state:
                    state["step"] = self._step_tensor(0, p)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                out.append((p, 0, {"exp_avg": state["exp_avg"].view(-1), "exp_avg_sq": state["exp_avg_sq"].view(-1)}))
        return out

    def _step_tensor(self, value: int, param: torch.Tensor) -> torch.Tensor:
        """Adam's step count as torch keeps it: on the parameter's device for the fused kernel."""
        fused = bool(self.optimizer.defaults.get("fused"))
        return torch.tensor(float(value), dtype=_get_scalar_dtype(is_fused=fused),
                            device=param.device if fused else "cpu")

    @property
    def checkpoint_step(self) -> int:
        """Adam's step count (the same for every parameter here)."""
        steps = [int(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        return max(steps, default=0)

    @checkpoint_step.setter
    def checkpoint_step(self, value: int) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state[p]
                if state:
                    state["step"] = self._step_tensor(value, p)

    def after_checkpoint_load(self, master_loaded: bool) -> None:
        """Nothing to do: parameters are their own master weights."""

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "loss_scaler": self.loss_scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss_scaler.load_state_dict(state["loss_scaler"])


def build_optimizer(model: torch.nn.Module, cfg, *, dp_group=None, model_parallel_group=None,
                    max_grad_norm: float = 0.0, master_weights: bool = False, loss_scaler=None):
    """`cfg` is an `OptimConfig`.

    - `adamw` / `adam` with fp32 parameters: torch's optimizer, replicated over DP.
    - `adamw` with bf16/fp16 parameters (O2): `FlatAdamW` with fp32 master weights, not sharded.
    - `distributed_fused_adam`: `FlatAdamW` sharded over DP (ZeRO-1), any precision.
    """
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={cfg.name!r} is not available; use one of {', '.join(OPTIMIZERS)}")
    if cfg.name == "distributed_fused_adam" or master_weights:
        if cfg.name == "adam":
            raise ValueError("optim.name=adam (L2 weight decay) has no master-weight variant; use adamw")
        return FlatAdamW(model, dp_group, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                         groups=group_parameters(model), shard=cfg.name == "distributed_fused_adam",
                         loss_scaler=loss_scaler, max_grad_norm=max_grad_norm,
                         model_parallel_group=model_parallel_group, bucket_size=cfg.bucket_size,
                         overlap_grad_sync=cfg.overlap_grad_sync)
    return ReplicatedAdamW(model, cfg, dp_group, max_grad_norm, loss_scaler)


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
        self.current_lr = lr
        self.optimizer.set_lr(self.step_count, lr)

    def step(self) -> None:
        self.step_count += 1
        self._apply(self.lr_at(self.step_count))

    @property
    def lr(self) -> float:
        """The schedule's lr (groups with their own lr rule may differ)."""
        return self.current_lr

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self._apply(self.lr_at(self.step_count))
