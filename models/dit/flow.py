"""Flow matching with velocity prediction: the interpolation convention, stated once.

With noise eps ~ N(0, I), target x1 and t in [0, 1] (t = 0 is noise, t = 1 is data):

    sigma(t) = sigma_max - (sigma_max - sigma_min) * t
    x_t      = sigma(t) * eps + t * x1
    u        = dx_t/dt = x1 - (sigma_max - sigma_min) * eps          (the velocity the network predicts)

With sigma_max = 1 this is x_t = (1 - (1 - sigma_min) t) eps + t x1, target x1 - (1 - sigma_min) eps
(Lipman et al.'s optimal-transport path). Sampling integrates dx/dt = v(x, t) from x_0 =
sigma_max * eps at t = 0 to t = 1 (models/dit/sampling.py). Given a predicted velocity v at (x_t, t),
the clean vector it implies is (solve the two equations above for x1 with u = v)

    x1_hat = v + (sigma_max - sigma_min) / sigma_max * (x_t - t * v)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FlowPath:
    sigma_min: float = 1.0e-4
    sigma_max: float = 1.0

    @property
    def slope(self) -> float:
        """sigma_max - sigma_min: how fast the noise scale falls with t."""
        return self.sigma_max - self.sigma_min

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_max - self.slope * t

    def interpolate(self, x1: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t for a batch: x1, eps [b, d], t [b]."""
        t = t.view(-1, *([1] * (x1.dim() - 1)))
        return self.sigma(t) * eps + t * x1

    def velocity(self, x1: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The regression target u = x1 - (sigma_max - sigma_min) eps."""
        return x1 - self.slope * eps

    def clean_from_velocity(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x1 implied by velocity v at (x_t, t)."""
        t = t.view(-1, *([1] * (v.dim() - 1)))
        return v + (self.slope / self.sigma_max) * (x_t - t * v)


def sample_timesteps(batch: int, method: str, generator: torch.Generator, mean: float = 0.0,
                     std: float = 1.0) -> torch.Tensor:
    """t in [0, 1]: uniform, or logit-normal (sigmoid of N(mean, std), SD3's) which puts more
    samples in the middle of the path."""
    if method == "uniform":
        return torch.rand(batch, generator=generator)
    if method == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    raise ValueError(f"model.flow.timestep_sampling={method!r}: use uniform or logit_normal")


class NoiseSource:
    """Noise, timesteps and condition-dropout draws for training, from a generator of their own.

    Draw k of data-parallel replica r comes from a generator seeded with (seed, r, k), so replicas
    draw independent noise, the tensor- and pipeline-parallel ranks of a replica agree (only the
    first stage draws; the draws travel in the pipeline message), and the whole state is the draw
    count: it is checkpointed as extra state (`state_dict`), identical on every rank that holds it,
    so resume is exact and a run may resume at another layout.
    """

    def __init__(self, seed: int, dp_rank: int):
        self.seed, self.dp_rank, self.draws = int(seed), int(dp_rank), 0

    def generator(self) -> torch.Generator:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.dp_rank) * 1_000_033 + self.draws)
        self.draws += 1
        return gen

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])


@dataclass
class FlowBatch:
    """One micro-batch on the flow path (drawn on the first pipeline stage, sent to the others)."""

    x1: torch.Tensor  # [b, d] target clean vectors
    t: torch.Tensor  # [b]
    x_t: torch.Tensor  # [b, d]
    u: torch.Tensor  # [b, d] target velocity
    keep_condition: torch.Tensor  # [b] 1.0 where the conditioning is kept, 0.0 where dropped (CFG)


def draw_flow_batch(x1: torch.Tensor, path: FlowPath, gen: torch.Generator, *, timestep_sampling: str = "uniform",
                    logit_normal_mean: float = 0.0, logit_normal_std: float = 1.0,
                    condition_dropout: float = 0.0) -> FlowBatch:
    """Noise, t and the condition-dropout mask for targets x1 (drawn on CPU, moved to x1's device)."""
    b, d = x1.shape
    t = sample_timesteps(b, timestep_sampling, gen, logit_normal_mean, logit_normal_std)
    eps = torch.randn(b, d, generator=gen)
    keep = (torch.rand(b, generator=gen) >= condition_dropout).float()
    t, eps, keep = (v.to(x1.device) for v in (t, eps, keep))
    x1 = x1.float()
    return FlowBatch(x1=x1, t=t, x_t=path.interpolate(x1, eps, t), u=path.velocity(x1, eps), keep_condition=keep)


def velocity_loss(v_pred: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Mean squared error over batch and dimensions (fp32)."""
    return F.mse_loss(v_pred.float(), u.float())


def contrastive_loss(pred: torch.Tensor, target: torch.Tensor, temperature: float, group=None,
                     gather_with_grad: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE between predicted clean vectors and their targets over the batch gathered
    from every data-parallel rank (as the CLIP loss), on L2-normalised vectors."""
    from parallel.collectives import all_gather_keep_local_grad, all_gather_with_grad

    pred, target = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
    gather = all_gather_with_grad if gather_with_grad else all_gather_keep_local_grad
    all_pred, all_target = gather(pred, group), gather(target, group)
    logits = all_pred @ all_target.T / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of paired rows."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean()


# The seed's quality bands for the running cosine between predicted and target vectors.
QUALITY_BANDS = ((0.85, "excellent"), (0.7, "good"), (0.0, "improving"))


def quality(cos: float) -> str:
    for threshold, name in QUALITY_BANDS:
        if cos > threshold:
            return name
    return "needs improvement"
