"""CLIP contrastive loss over the data-parallel global batch (NeMo/open_clip `local_loss`,
`gather_with_grad`).

Features are gathered over the DP group only: TP ranks of one replica hold identical features.
- local_loss=False: every rank builds the full [global_b, global_b] logits.
- local_loss=True: a rank builds only its rows, [local_b, global_b], against all columns; with
  gather_with_grad the mean of these per-rank losses equals the global loss, and so do its gradients.
- gather_with_grad=False: other ranks' features are constants; with local_loss=False each rank's
  gradient is the global one divided by the DP size except for logit_scale's (open_clip's
  behaviour), with local_loss=True the
  cross-rank terms are missing.
The engine averages gradients over DP, so the optimiser sees the mean over ranks of these losses.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.collectives import all_gather_keep_local_grad, all_gather_with_grad


class ContrastiveLoss(torch.nn.Module):
    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, group=None):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.group = group

    def _world(self) -> tuple[int, int]:
        if self.group is None or not dist.is_initialized():
            return 1, 0
        return dist.get_world_size(self.group), dist.get_rank(self.group)

    def forward(self, image_features, text_features, logit_scale):
        world, rank = self._world()
        local_b = image_features.shape[0]
        if world > 1:
            gather = all_gather_with_grad if self.gather_with_grad else all_gather_keep_local_grad
            all_image = gather(image_features, self.group)
            all_text = gather(text_features, self.group)
        else:
            all_image, all_text = image_features, text_features
        if self.local_loss:
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
            labels = torch.arange(local_b, device=image_features.device) + rank * local_b
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
            labels = torch.arange(all_image.shape[0], device=image_features.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
