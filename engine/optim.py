"""AdamW with the model's own weight-decay policy, and the step-based learning-rate schedules (warmup +
cosine, constant, OneCycle)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.optim.optimizer import _get_scalar_dtype

from engine.config import ConfigError
from engine.distributed_optimizer import FlatAdamW, StepResult
from engine.grad_norm import clip_grad_norm
from engine.loss_scaler import ConstantLossScaler
from engine.schema import LR_SCHEDULES, OPTIMIZERS  # one list of names each, checked when the config loads
from parallel.data_parallel import GradientAverager
from parallel.sequence_parallel import allreduce_sequence_parallel_grads

log = logging.getLogger("engine")


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
        groups = group_parameters(model)
        if not groups:
            raise ValueError("no parameter of the model trains (every one has requires_grad=False): nothing to optimize")
        self.params = [p for p in model.parameters() if p.requires_grad]
        torch_groups = param_groups(model, cfg.weight_decay, groups)
        if cfg.name == "adamw_8bit":
            self.optimizer = adamw_8bit(torch_groups, cfg)
        else:
            opt_cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
            # torch's fused kernel (CPU and CUDA) reads and writes each element once; its default on
            # CPU is a per-tensor loop of ~7 elementwise passes (3.6x slower for B/32 on one core).
            fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in self.params)
            self.optimizer = opt_cls(torch_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)
        self.eight_bit = cfg.name == "adamw_8bit"
        self.param_groups = self.optimizer.param_groups
        self.lr_fns = [group.lr for group, _ in groups]  # beside torch's groups (their state_dict pickles)
        self.averager = GradientAverager(self.params, dp_group, row_sparse=token_embedding_weights(model))
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
        step the state is created as torch's first step would (zeros, step 0), so it can be loaded into.
        8-bit Adam's quantized moments have no such view: none are saved (a resume restarts them)."""
        if self.eight_bit:
            _warn_8bit_not_checkpointed()
            return []
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


def adamw_8bit(torch_groups: list, cfg):
    """bitsandbytes' AdamW8bit over `torch_groups` (an optional GPU extra, never required): a
    ConfigError naming the way out where bitsandbytes is missing or the parameters are not on a GPU."""
    params = [p for group in torch_groups for p in group["params"]]
    if any(p.device.type != "cuda" for p in params):
        raise ConfigError("optim.name=adamw_8bit (bitsandbytes) needs the parameters on a CUDA device; use "
                          "optim.name=adamw on CPU")
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ConfigError("optim.name=adamw_8bit needs bitsandbytes, an optional GPU extra: pip install "
                          "bitsandbytes (or use optim.name=adamw)") from exc
    return bnb.optim.AdamW8bit(torch_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


_warned_8bit = False


def _warn_8bit_not_checkpointed() -> None:
    global _warned_8bit
    if not _warned_8bit:
        log.warning("optim.name=adamw_8bit: the 8-bit Adam moments are not saved in checkpoints; a resumed run "
                    "restarts them (weights, schedule, step and data position resume exactly)")
        _warned_8bit = True


def token_embedding_weights(model: torch.nn.Module) -> list:
    """The weights of the model's embedding tables (megatron's VocabParallelEmbedding, torch's
    Embedding): a batch's gradient touches only the rows of the ids it holds."""
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    return [m.weight for m in model.modules() if isinstance(m, (VocabParallelEmbedding, torch.nn.Embedding))]


def build_optimizer(model: torch.nn.Module, cfg, *, dp_group=None, model_parallel_group=None,
                    max_grad_norm: float = 0.0, master_weights: bool = False, loss_scaler=None):
    """`cfg` is an `OptimConfig`.

    - `adamw` / `adam` with fp32 parameters: torch's optimizer, replicated over DP.
    - `adamw` with bf16/fp16 parameters (O2): `FlatAdamW` with fp32 master weights, not sharded.
    - `distributed_fused_adam`: `FlatAdamW` sharded over DP (ZeRO-1), any precision.
    - `adamw_8bit`: bitsandbytes' AdamW8bit on fp32 CUDA parameters, replicated over DP.
    """
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={cfg.name!r} is not available; use one of {', '.join(OPTIMIZERS)}")
    if cfg.name == "adamw_8bit" and master_weights:
        raise ConfigError("optim.name=adamw_8bit keeps its own 8-bit moments of fp32 parameters: use it without "
                          "model.megatron_amp_O2 (trainer.precision=bf16 autocast works)")
    if cfg.name == "distributed_fused_adam" or master_weights:
        if cfg.name == "adam":
            raise ValueError("optim.name=adam (L2 weight decay) has no master-weight variant; use adamw")
        return FlatAdamW(model, dp_group, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                         groups=group_parameters(model), shard=cfg.name == "distributed_fused_adam",
                         loss_scaler=loss_scaler, max_grad_norm=max_grad_norm,
                         model_parallel_group=model_parallel_group, bucket_size=cfg.bucket_size,
                         overlap_grad_sync=cfg.overlap_grad_sync)
    return ReplicatedAdamW(model, cfg, dp_group, max_grad_norm, loss_scaler)


def one_cycle_lr(step: int, max_lr: float, total_steps: int, pct_start: float = 0.1, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, final_lr: float | None = None) -> float:
    """torch's `OneCycleLR` (cosine annealing, two phases) as a function of the step: from
    max_lr / div_factor up to max_lr at step pct_start * total_steps - 1, then down to `final_lr`
    (default max_lr / div_factor / final_div_factor) at the last step."""
    if total_steps < 2 or not 0.0 < pct_start < 1.0:
        raise ValueError(f"one-cycle schedule needs total_steps >= 2 and 0 < pct_start < 1 "
                         f"(got {total_steps}, {pct_start})")
    initial = max_lr / div_factor
    final = initial / final_div_factor if final_lr is None else final_lr
    peak = float(pct_start * total_steps) - 1
    last = total_steps - 1

    def anneal(start, end, pct):
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    step = min(max(step, 0), last)
    if step <= peak:
        return anneal(initial, max_lr, step / peak if peak > 0 else 1.0)
    return anneal(max_lr, final, (step - peak) / (last - peak))


class WarmupCosineSchedule:
    """The lr of every optimizer step (`optim.sched.name`):

    - cosine: linear warmup from 0 to `max_lr` over `warmup_steps`, then cosine decay to `min_lr`
      at `max_steps`;
    - constant: the same warmup, then `max_lr`;
    - onecycle: torch's OneCycleLR with `pct_start = warmup_steps / max_steps` (its rise phase,
      from max_lr / 25), ending at `min_lr`, or at max_lr / 25 / 1e4 (torch's default) when 0.
    """

    def __init__(self, optimizer, max_lr: float, warmup_steps: int, max_steps: int,
                 min_lr: float = 0.0, name: str = "cosine"):
        if name not in LR_SCHEDULES:
            raise ValueError(f"optim.sched.name={name!r}: use one of {', '.join(LR_SCHEDULES)}")
        if name == "onecycle" and not 0 < warmup_steps < max_steps:
            raise ConfigError(f"optim.sched.name=onecycle needs 0 < optim.sched.warmup_steps < trainer.max_steps "
                              f"(its rise phase; got {warmup_steps} of {max_steps}): the seed's pct_start 0.1 is "
                              f"warmup_steps={max(1, max_steps // 10)}")
        self.optimizer, self.max_lr, self.min_lr = optimizer, max_lr, min_lr
        self.warmup_steps, self.max_steps, self.name = warmup_steps, max_steps, name
        self.step_count = 0
        self._apply(self.lr_at(0))

    def lr_at(self, step: int) -> float:
        if self.name == "onecycle":
            return one_cycle_lr(step, self.max_lr, self.max_steps, self.warmup_steps / self.max_steps,
                                final_lr=self.min_lr if self.min_lr > 0 else None)
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
