"""ODE samplers for the flow (Euler, Heun) and generation of global vectors from a trained DiT.

The flow runs from t = 0 (x_0 = sigma_max * eps) to t = 1 (models/dit/flow.py) on a uniform grid of
`num_steps` steps. Euler is first order; Heun (explicit trapezoid: an Euler predictor, then the
average of the velocities at both ends) is second order and costs two velocity evaluations per step.

Generation is deterministic from a seed: sample i starts from noise drawn with (seed, i), so the
result does not depend on the batch split or on how many data-parallel ranks share the work.
Under pipeline parallelism each velocity evaluation runs through every stage and the last stage
broadcasts it over the pipeline group, so every stage keeps the same ODE state.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from models.dit.flow import FlowPath

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [b, d], t [b]) -> v [b, d]
SOLVERS = ("euler", "heun")


def integrate(velocity: Velocity, x0: torch.Tensor, num_steps: int, method: str = "euler",
              t0: float = 0.0, t1: float = 1.0) -> torch.Tensor:
    """x(t1) of dx/dt = velocity(x, t) from x(t0) = x0 with `num_steps` uniform steps."""
    if method not in SOLVERS:
        raise ValueError(f"sampler {method!r}: use one of {', '.join(SOLVERS)}")
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    x, h = x0, (t1 - t0) / num_steps
    for k in range(num_steps):
        t = torch.full((x.shape[0],), t0 + k * h, dtype=torch.float32, device=x.device)
        v = velocity(x, t)
        if method == "euler":
            x = x + h * v
        else:
            predicted = x + h * v
            x = x + 0.5 * h * (v + velocity(predicted, t + h))
    return x


def initial_noise(indices: torch.Tensor, dim: int, seed: int, sigma_max: float = 1.0) -> torch.Tensor:
    """x_0 of each sample: sigma_max * N(0, I) drawn from a generator seeded with (seed, index)."""
    rows = [torch.randn(dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i) + 1))
            for i in indices.tolist()]
    return sigma_max * torch.stack(rows) if rows else torch.zeros(0, dim)


def guided(velocity_cond: Velocity, velocity_uncond: Velocity | None, scale: float) -> Velocity:
    """Classifier-free guidance: v_u + scale * (v_c - v_u); scale 1 (or no unconditional model) is v_c."""
    if velocity_uncond is None or scale == 1.0:
        return velocity_cond
    return lambda x, t: velocity_uncond(x, t) + scale * (velocity_cond(x, t) - velocity_uncond(x, t))


def model_velocity(model, condition: torch.Tensor, link=None, keep_condition: float = 1.0) -> Velocity:
    """v(x, t) of `model` (a GlobalDiT stage) for a fixed conditioning batch; `keep_condition` 0
    gives the unconditional velocity (the null condition). With a pipeline `link`, every stage
    calls it with the same x and t and gets the last stage's velocity back."""
    from engine.schedules import pipelined_forward

    keep = None if keep_condition == 1.0 else torch.full((condition.shape[0],), keep_condition,
                                                         device=condition.device)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if link is None:
            return model(condition, x, t, keep).float()
        out = pipelined_forward(model, link, lambda inputs: model.stage_forward(
            inputs, condition=condition, x_t=x, t=t, keep_condition=keep))
        v = torch.empty_like(x, dtype=torch.float32)
        if out is not None:
            v.copy_(out.float())
        dist.broadcast(v, dist.get_global_rank(link.group, link.size - 1), group=link.group)
        return v

    return velocity


@torch.no_grad()
def generate(model, condition: torch.Tensor, indices: torch.Tensor, *, num_steps: int = 50, sampler: str = "euler",
             guidance_scale: float = 1.0, seed: int = 0, path: FlowPath | None = None, link=None) -> torch.Tensor:
    """Clean global vectors [b, output_dim] for a conditioning batch [b, P, condition_dim]; sample j
    starts from the noise of `indices[j]`."""
    path = path or FlowPath()
    was_training = model.training
    model.eval()
    try:
        x0 = initial_noise(indices, model.cfg.output_dim, seed, path.sigma_max).to(condition.device)
        cond = model_velocity(model, condition, link)
        uncond = model_velocity(model, condition, link, keep_condition=0.0) if guidance_scale != 1.0 else None
        return integrate(guided(cond, uncond, guidance_scale), x0, num_steps, sampler)
    finally:
        model.train(was_training)
