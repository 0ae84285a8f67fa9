"""Zero-shot classification and image<->text retrieval for contrastive models.

Model-agnostic: takes `encode_image` / `encode_text` callables that return L2-normalised features.
Evaluation batches are split over data-parallel ranks (batch i goes to rank i % DP) and the
features are gathered, so every rank reports the same numbers over the whole evaluation set.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def class_embeddings(encode_text, tokenize, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """One embedding per class: the normalised mean over prompt templates (CLIP's prompt ensemble)."""
    rows = []
    for name in classnames:
        feats = encode_text(tokenize([t.format(name) for t in templates]))
        mean = feats.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def _gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenate rows from every DP rank (sizes may differ); rank order."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, tensor.cpu(), group=group)
    return torch.cat(parts).to(tensor.device)


@torch.no_grad()
def collect_features(encode_image, encode_text, batches, dp_rank: int, dp_size: int, dp_group, device):
    """Features of this rank's share of `batches`, gathered over DP: (images, texts, labels|None)."""
    images, texts, labels = [], [], []
    for i, batch in enumerate(batches):
        if i % dp_size != dp_rank:
            continue
        images.append(encode_image(batch["images"].to(device)).float().cpu())
        texts.append(encode_text(batch["tokens"].to(device)).float().cpu())
        if "class_index" in batch:
            labels.append(batch["class_index"].cpu())
    empty = torch.zeros(0, 0)
    image_feats = torch.cat(images) if images else empty
    text_feats = torch.cat(texts) if texts else empty
    label_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    image_feats, text_feats = _gather_rows(image_feats, dp_group), _gather_rows(text_feats, dp_group)
    label_t = _gather_rows(label_t, dp_group)
    return image_feats, text_feats, (label_t if label_t.numel() else None)


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
