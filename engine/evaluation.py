"""Zero-shot classification and image<->text retrieval for contrastive models.

Model-agnostic: takes `encode_image` / `encode_text` callables that return L2-normalised features.
Evaluation batches are split over data-parallel ranks (batch i goes to rank i % DP) and the
features are gathered back in batch order, so every rank reports the same numbers over the whole
evaluation set, equal to a one-process evaluation's.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger("engine")


@torch.no_grad()
def class_embeddings(encode_text, tokenize, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """One embedding per class: the normalised mean over prompt templates (CLIP's prompt ensemble)."""
    rows = []
    for name in classnames:
        feats = encode_text(tokenize([t.format(name) for t in templates]))
        mean = feats.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def _all_gather_objects(obj, group) -> list:
    """[obj of DP rank 0, 1, ...] on every rank."""
    if group is None or dist.get_world_size(group) == 1:
        return [obj]
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


@torch.no_grad()
def collect_features(encode_image, encode_text, batches, dp_rank: int, dp_size: int, dp_group, device):
    """Features of the whole of `batches`, each rank encoding its share: (images, texts, labels|None),
    on the CPU, rows in the order of `batches` whatever the split (DP=N returns what DP=1 does).

    A rank may have no batch at all (fewer batches than DP ranks). Labels (`class_index`) are
    returned only when every batch has them; when some lack them zero-shot cannot be scored, which
    is logged. An evaluation set without any batch is an error."""
    mine = []  # (batch index, image features, text features, labels or None)
    for i, batch in enumerate(batches):
        if i % dp_size != dp_rank:
            continue
        labels = batch["class_index"].cpu() if "class_index" in batch else None
        mine.append((i, encode_image(batch["images"].to(device)).float().cpu(),
                     encode_text(batch["tokens"].to(device)).float().cpu(), labels))
    everyone = sorted((item for part in _all_gather_objects(mine, dp_group) for item in part), key=lambda it: it[0])
    if not everyone:
        raise ValueError("the evaluation set is empty: its loader yielded no batch (check data.eval_shards)")
    images = torch.cat([it[1] for it in everyone])
    texts = torch.cat([it[2] for it in everyone])
    labelled = [it for it in everyone if it[3] is not None]
    labels = None
    if len(labelled) == len(everyone):
        labels = torch.cat([it[3] for it in everyone])
    elif labelled and _global_rank() == 0:
        log.warning("%d of %d evaluation batches carry class_index, the others do not: zero-shot accuracy is not "
                    "scored", len(labelled), len(everyone))
    return images, texts, labels


def _global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def zero_shot_accuracy(image_feats: torch.Tensor, labels: torch.Tensor, class_embeds: torch.Tensor,
                       topk=(1, 5), attributes: dict | None = None) -> dict:
    """Top-k accuracy; with `attributes` ({name: value per class}), also how often the top-1 class
    shares each attribute with the true class (e.g. right colour, right shape)."""
    logits = image_feats @ class_embeds.T.to(image_feats.dtype)
    out = {}
    for k in topk:
        if k > class_embeds.shape[0]:
            continue
        hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"zero_shot_top{k}"] = hits.float().mean().item()
    predicted = logits.argmax(dim=1).tolist()
    for name, values in (attributes or {}).items():
        same = [values[p] == values[t] for p, t in zip(predicted, labels.tolist())]
        out[f"zero_shot_{name}_acc"] = sum(same) / max(1, len(same))
    return out


def retrieval_recall(image_feats: torch.Tensor, text_feats: torch.Tensor, ks=(1, 5)) -> dict:
    """Pair i is (image i, caption i); R@k for image->text and text->image."""
    sims = image_feats @ text_feats.T
    target = torch.arange(sims.shape[0])
    out = {}
    for k in ks:
        k_eff = min(k, sims.shape[1])
        out[f"image_to_text_R@{k}"] = (sims.topk(k_eff, dim=1).indices == target[:, None]).any(1).float().mean().item()
        out[f"text_to_image_R@{k}"] = (sims.T.topk(k_eff, dim=1).indices == target[:, None]).any(1).float().mean().item()
    return out
