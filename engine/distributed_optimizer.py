"""AdamW over a flat fp32 copy of the parameters, optionally sharded over data parallelism (ZeRO-1).

This is what `optim.name: distributed_fused_adam` runs (NeMo's name), and what `adamw` runs under
bf16/fp16 (O2: low-precision parameters, fp32 master weights). One code path on CPU/gloo and
GPU/NCCL:

- the model's parameters are re-pointed into one flat buffer, so updated values arrive with a
  single all-gather straight into the parameters;
- every parameter gets an fp32 `main_grad` view of one flat gradient buffer; a post-accumulate hook
  adds each micro-batch's gradient into it and frees the low-precision `.grad` (fp32 accumulation);
- at the step, the gradient buffer is reduce-scattered over DP (sharded) or all-reduced (not);
  each rank unscales, checks for inf/NaN (agreed over all ranks), clips by the global norm, and
  runs Adam on its shard of the fp32 master weights with its shard of the moments; then the shards
  are all-gathered back into the parameters.

Optimizer state per rank: master + exp_avg + exp_avg_sq = 12 bytes per parameter / DP when sharded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.grad_norm import counts_toward_norm
from engine.loss_scaler import ConstantLossScaler


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool


@dataclass
class _Segment:
    """Where one parameter's elements fall inside this rank's shard."""

    param: torch.nn.Parameter
    start: int  # within the shard
    end: int
    decay: bool
    counts_toward_norm: bool


class FlatAdamW:
    def __init__(self, model: torch.nn.Module, dp_group, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, no_decay=lambda name, p: False, shard: bool = True,
                 loss_scaler=None, max_grad_norm: float = 0.0, model_parallel_group=None):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise ValueError(f"all trainable parameters must share one dtype, found {sorted(map(str, dtypes))}")
        self.dp_group, self.mp_group = dp_group, model_parallel_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self.sharded = shard and self.dp_size > 1
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.max_grad_norm = max_grad_norm
        self.loss_scaler = loss_scaler or ConstantLossScaler()
        self.param_groups = [{"lr": lr}]  # what LR schedules write to
        self.step_count = 0

        device, dtype = named[0][1].device, named[0][1].dtype
        numel = sum(p.numel() for _, p in named)
        parts = self.dp_size if self.sharded else 1
        self.shard_size = math.ceil(numel / parts)
        padded = self.shard_size * parts
        self.param_buffer = torch.zeros(padded, dtype=dtype, device=device)
        self.grad_buffer = torch.zeros(padded, dtype=torch.float32, device=device)
        self.shard_start = self.dp_rank * self.shard_size if self.sharded else 0
        shard_end = self.shard_start + self.shard_size
        self.segments: list[_Segment] = []
        self._hooks = []
        offset = 0
        for name, p in named:
            n = p.numel()
            view = self.param_buffer[offset:offset + n].view_as(p)
            view.copy_(p.data)
            p.data = view
            p.main_grad = self.grad_buffer[offset:offset + n].view_as(p)
            self._hooks.append(p.register_post_accumulate_grad_hook(_accumulate_into_main_grad))
            lo, hi = max(offset, self.shard_start), min(offset + n, shard_end)
            if lo < hi:
                self.segments.append(_Segment(p, lo - self.shard_start, hi - self.shard_start,
                                              not no_decay(name, p), counts_toward_norm(p)))
            offset += n
        shard = slice(self.shard_start, shard_end)
        self.master = self.param_buffer[shard].float().clone()
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.decay_mask = torch.zeros_like(self.master)
        for seg in self.segments:
            if seg.decay:
                self.decay_mask[seg.start:seg.end] = 1.0
        self._grad_shard = self.grad_buffer[shard] if not self.sharded else torch.zeros_like(self.master)

    # -- interface used by the trainer ------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale

    def zero_grad(self) -> None:
        self.grad_buffer.zero_()

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (master weights and both moments)."""
        return sum(t.numel() * t.element_size() for t in (self.master, self.exp_avg, self.exp_avg_sq))

    def step(self) -> StepResult:
        grad = self._reduce_gradients()
        scale = self.loss_scaler.scale
        if scale != 1.0:
            grad.mul_(1.0 / scale)
        found_inf = torch.tensor(0.0 if bool(torch.isfinite(grad).all()) else 1.0, device=grad.device)
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)  # every rank, every group: skip together
        norm = self._global_norm(grad) if not found_inf.item() else float("inf")
        skipped = bool(found_inf.item()) or not math.isfinite(norm)
        self.loss_scaler.update(skipped)
        if skipped:
            self.zero_grad()
            return StepResult(norm, True)
        if self.max_grad_norm > 0 and norm > self.max_grad_norm:
            grad.mul_(self.max_grad_norm / (norm + 1e-6))
        self._adam(grad)
        self._publish_parameters()
        self.zero_grad()
        return StepResult(norm, False)

    # -- steps ------------------------------------------------------------------------------------
    def _reduce_gradients(self) -> torch.Tensor:
        if self.dp_size == 1:
            return self._grad_shard
        self.grad_buffer.div_(self.dp_size)
        if self.sharded:
            dist.reduce_scatter_tensor(self._grad_shard, self.grad_buffer, group=self.dp_group)
        else:
            dist.all_reduce(self.grad_buffer, group=self.dp_group)
        return self._grad_shard

    def _global_norm(self, grad: torch.Tensor) -> float:
        sq = torch.zeros((), dtype=torch.float32, device=grad.device)
        for seg in self.segments:
            if seg.counts_toward_norm:
                sq += grad[seg.start:seg.end].pow(2).sum()
        if self.sharded:
            dist.all_reduce(sq, group=self.dp_group)  # shards of one replica's gradient
        if self.mp_group is not None:
            dist.all_reduce(sq, group=self.mp_group)  # TP shards and pipeline stages
        return sq.sqrt().item()

    def _adam(self, grad: torch.Tensor) -> None:
        self.step_count += 1
        lr = self.param_groups[0]["lr"]
        beta1, beta2 = self.betas
        bias1 = 1 - beta1 ** self.step_count
        bias2 = 1 - beta2 ** self.step_count
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if self.weight_decay:
            self.master.mul_(1 - lr * self.weight_decay * self.decay_mask)  # decoupled (AdamW)
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(self.eps)
        self.master.addcdiv_(self.exp_avg, denom, value=-lr / bias1)

    def _publish_parameters(self) -> None:
        shard = self.param_buffer[self.shard_start:self.shard_start + self.shard_size]
        shard.copy_(self.master)
        if self.sharded:
            dist.all_gather_into_tensor(self.param_buffer, shard.clone(), group=self.dp_group)

    # -- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "master": self.master, "exp_avg": self.exp_avg,
                "exp_avg_sq": self.exp_avg_sq, "loss_scaler": self.loss_scaler.state_dict(),
                "lr": self.param_groups[0]["lr"], "shard_start": self.shard_start,
                "shard_size": self.shard_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["shard_start"], state["shard_size"]) != (self.shard_start, self.shard_size):
            raise ValueError("optimizer shard layout differs from the checkpoint's; re-shard it first")
        self.step_count = state["step_count"]
        for name in ("master", "exp_avg", "exp_avg_sq"):
            getattr(self, name).copy_(state[name])
        self.loss_scaler.load_state_dict(state["loss_scaler"])
        self.param_groups[0]["lr"] = state["lr"]
        self._publish_parameters()


def _accumulate_into_main_grad(param: torch.nn.Parameter) -> None:
    """Post-accumulate hook: fold this backward's gradient into the fp32 buffer, free `.grad`."""
    param.main_grad.add_(param.grad)
    param.grad = None
