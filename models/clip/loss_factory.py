"""`create_loss`: the CLIP family's training loss from its config (open_clip's `factory.create_loss` shape).

| `model.loss.name` | module | call |
|---|---|---|
| clip | `ContrastiveLoss` | `loss(image_features, text_features, logit_scale)` |
| fastclip | `FastCLIPLoss` | `loss(image_features, text_features, logit_scale, sample_index=, epoch=)` |
| either, with `model.distill.mode` | `DistillationLoss` around it | adds `teacher_image_features=, teacher_text_features=, teacher_logit_scale=` |

The returned module says what it needs: `needs_sample_index` (the batch's sample indices and the
epoch) and `needs_teacher` (the frozen teacher's outputs, `distill.teacher_outputs`). A loss with
per-sample state exposes it as `sample_state` (a checkpoint `Stateful`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.clip.distill import DistillationLoss, DistillConfig, validate_distill
from models.clip.fastclip import (
    FastCLIPConfig,
    FastCLIPLoss,
    resolve_lr_tau,
    resolve_version,
)
from models.clip.loss import ContrastiveLoss

LOSS_NAMES = ("clip", "fastclip")


@dataclass
class _LossName:
    name: str = "clip"  # clip | fastclip


@dataclass
class LossConfig(FastCLIPConfig, _LossName):
    """`model.loss.*`: which loss (`name`, listed first), and FastCLIP's settings (ignored by `clip`)."""

    # Samples per FastCLIP epoch (gamma and the v2 moments change per epoch): the reference's
    # --train-num-samples; -1: data_size (one pass over the rows).
    samples_per_epoch: int = -1


def create_loss(cfg: LossConfig, *, group=None, local_loss: bool = False, gather_with_grad: bool = True,
                data_size: int | None = None, device=None, model_lr: float | None = None,
                distill: DistillConfig | None = None) -> torch.nn.Module:
    """The loss module. `group` is the DP group; `data_size` overrides `cfg.data_size`; `device`
    holds FastCLIP's per-sample state (the training device: NCCL collectives need it on the GPU);
    `model_lr` resolves `lr_tau < 0` as the reference does."""
    if cfg.name not in LOSS_NAMES:
        raise ValueError(f"model.loss.name={cfg.name!r}: use one of {', '.join(LOSS_NAMES)}")
    if cfg.name == "clip":
        loss = ContrastiveLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, group=group)
    else:
        spec = resolve_version(cfg)
        lr_tau = None
        if spec.temperature_scheme == "individual":
            lr_tau = resolve_lr_tau(cfg, model_lr) if model_lr is not None else cfg.lr_tau
        loss = FastCLIPLoss(cfg, data_size=data_size, group=group, device=device, lr_tau=lr_tau)
    if distill is not None and distill.mode is not None:
        validate_distill(distill, need_teacher=False)
        loss = DistillationLoss(loss, distill.mode, distill.weight, local_loss=local_loss,
                                gather_with_grad=gather_with_grad, group=group)
    return loss
