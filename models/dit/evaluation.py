"""Evaluation of the DiT, during training and standalone, beside two baselines on the same set.

For every evaluation sample i (conditioning features, target x1_i, the target tower's own image
embedding, the target CLIP's embedding of caption i):

- dit: x1_hat_i generated from noise by the ODE sampler (models/dit/sampling.py);
- ceiling: the target tower's own image embedding (what the target CLIP itself gives);
- linear: a linear map (with bias) from the mean-pooled conditioning features to x1, fitted in
  closed form (ridge) on training samples: what a DiT must beat to be worth its cost.

Metrics of each: cosine to x1_i (mean), recall@1/5 against the target set (is x1_i among the k
targets most similar to the prediction?) and against the caption embeddings (is caption i among
the k most similar captions?: the target CLIP's image->text retrieval with the prediction as the
image embedding). Batches are split over data-parallel ranks (batch j to rank j % DP) and the
vectors gathered, so every rank reports the same numbers over the whole set.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.dit.data import TargetSpec, iter_ranges, make_targets
from models.dit.embeddings import EmbeddingSet
from models.dit.flow import FlowPath
from models.dit.sampling import generate

log = logging.getLogger("engine")
METHODS = ("dit", "ceiling", "linear")


def recall_at_k(queries: torch.Tensor, keys: torch.Tensor, ks=(1, 5)) -> dict:
    """Query i's match is key i; cosine similarity."""
    sims = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T
    target = torch.arange(sims.shape[0])
    return {k: (sims.topk(min(k, sims.shape[1]), dim=1).indices == target[:, None]).any(1).float().mean().item()
            for k in ks}


def method_metrics(name: str, pred: torch.Tensor, x1: torch.Tensor, text: torch.Tensor | None) -> dict:
    out = {f"{name}_cosine": F.cosine_similarity(pred.float(), x1.float(), dim=-1).mean().item()}
    for k, value in recall_at_k(pred, x1).items():
        out[f"{name}_target_R@{k}"] = value
    if text is not None:
        for k, value in recall_at_k(pred, text).items():
            out[f"{name}_text_R@{k}"] = value
    return out


def _target_names(target: TargetSpec) -> list[str]:
    return ["target_patches"] if target.kind == "mean_pooled_patches" else []


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def fit_linear_baseline(train: EmbeddingSet, target: TargetSpec, num_samples: int, ridge: float, batch_size: int = 256,
                        dp_rank: int = 0, dp_size: int = 1, dp_group=None) -> torch.Tensor:
    """W [Dc + 1, d] minimising |[pooled, 1] W - x1|^2 + ridge * mean feature variance * |W|^2 over the
    first `num_samples` training samples (the normal equations summed over DP ranks, fp64)."""
    projection = train.projection() if target.kind == "mean_pooled_patches" else None
    names = ["condition"] + _target_names(target) + (["target_embedding"] if target.kind == "image_embedding" else [])
    dim_in = train.shape("condition")[-1] + 1
    xtx = torch.zeros(dim_in, dim_in, dtype=torch.float64)
    xty, count = None, 0
    for _, rows in iter_ranges(train, batch_size, names, limit=num_samples, every=dp_size, offset=dp_rank):
        pooled = rows["condition"].mean(dim=1).double()
        x = torch.cat([pooled, torch.ones(pooled.shape[0], 1, dtype=torch.float64)], dim=1)
        y = make_targets(rows, target, projection).double()
        xty = x.T @ y if xty is None else xty + x.T @ y
        xtx += x.T @ x
        count += x.shape[0]
    if xty is None:
        xty = torch.zeros(dim_in, train.shape("target_embedding")[-1], dtype=torch.float64)
    xtx, xty = _all_reduce(xtx, dp_group), _all_reduce(xty, dp_group)
    variance = torch.diagonal(xtx)[:-1].mean() / max(1.0, float(_all_reduce(torch.tensor(float(count)), dp_group)))
    penalty = ridge * variance * torch.eye(dim_in, dtype=torch.float64)
    penalty[-1, -1] = 0.0  # the bias is not penalised
    return torch.linalg.solve(xtx + penalty, xty).float()


class DiTEvaluator:
    """`evaluator(step) -> metrics`: collective over every rank of the run."""

    def __init__(self, model, eval_set: EmbeddingSet, target: TargetSpec, *, path: FlowPath, sampler: str = "euler",
                 num_steps: int = 50, guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 256,
                 max_samples: int | None = None, baselines: bool = True, train_set: EmbeddingSet | None = None,
                 baseline_fit_samples: int = 20000, baseline_ridge: float = 1e-3, dp_rank: int = 0, dp_size: int = 1,
                 dp_group=None, link=None, device=None, log_table: bool = True):
        self.model, self.eval_set, self.target, self.path = model, eval_set, target, path
        self.sampler, self.num_steps, self.guidance_scale, self.seed = sampler, num_steps, guidance_scale, seed
        self.batch_size, self.max_samples, self.baselines, self.train_set = batch_size, max_samples, baselines, train_set
        self.baseline_fit_samples, self.baseline_ridge = baseline_fit_samples, baseline_ridge
        self.dp_rank, self.dp_size, self.dp_group, self.link = dp_rank, dp_size, dp_group, link
        self.device = device if device is not None else torch.device("cpu")
        self.log_table = log_table
        self.projection = eval_set.projection() if target.kind == "mean_pooled_patches" else None
        self._linear = None
        self._reference = None  # (x1, own embedding, text, linear prediction): the same at every evaluation

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dp_group is None or not dist.is_initialized() or dist.get_world_size(self.dp_group) == 1:
            return tensor
        parts = [None] * dist.get_world_size(self.dp_group)
        dist.all_gather_object(parts, tensor.cpu(), group=self.dp_group)
        return torch.cat(parts)

    def _rows(self, names):
        return iter_ranges(self.eval_set, self.batch_size, names, limit=self.max_samples, every=self.dp_size,
                           offset=self.dp_rank)

    def _reference_vectors(self) -> dict:
        """x1, the target tower's embedding, caption embeddings and the linear baseline's prediction of
        every eval sample (gathered, in sample order); computed once."""
        if self._reference is not None:
            return self._reference
        if self.baselines and self._linear is None and self.train_set is not None:
            self._linear = fit_linear_baseline(self.train_set, self.target, self.baseline_fit_samples,
                                               self.baseline_ridge, self.batch_size, self.dp_rank, self.dp_size,
                                               self.dp_group)
        text = self.eval_set.has("text_embedding")
        names = ["condition", "target_embedding"] + _target_names(self.target) + (["text_embedding"] if text else [])
        parts = {k: [] for k in ("index", "x1", "own", "text", "linear")}
        for index, rows in self._rows(names):
            parts["index"].append(index)
            parts["x1"].append(make_targets(rows, self.target, self.projection))
            parts["own"].append(rows["target_embedding"])
            if text:
                parts["text"].append(rows["text_embedding"])
            if self._linear is not None:
                pooled = rows["condition"].mean(dim=1)
                parts["linear"].append(torch.cat([pooled, torch.ones(pooled.shape[0], 1)], dim=1) @ self._linear)
        dim = self.eval_set.shape("target_embedding")[-1]

        def gathered(key):
            local = torch.cat(parts[key]) if parts[key] else torch.zeros(0, dim)
            return self._gather(local)[order]

        index = self._gather(torch.cat(parts["index"]) if parts["index"] else torch.zeros(0, dtype=torch.long))
        order = torch.argsort(index)
        ref = {"index": index[order], "x1": gathered("x1"), "own": gathered("own"),
               "text": gathered("text") if text else None,
               "linear": gathered("linear") if self._linear is not None else None}
        self._reference = ref
        return ref

    @torch.no_grad()
    def generate_all(self) -> torch.Tensor:
        """x1_hat of every eval sample (gathered, in sample order)."""
        first_stage = getattr(self.model, "pre_process", True)
        indices, vectors = [], []
        for index, rows in self._rows(["condition"] if first_stage else []):
            cond = rows["condition"].to(self.device) if first_stage else torch.zeros(index.shape[0], 0, device=self.device)
            vectors.append(generate(self.model, cond, index, num_steps=self.num_steps, sampler=self.sampler,
                                    guidance_scale=self.guidance_scale, seed=self.seed, path=self.path,
                                    link=self.link).cpu())
            indices.append(index)
        index = self._gather(torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long))
        generated = self._gather(torch.cat(vectors) if vectors else torch.zeros(0, self.model.cfg.output_dim))
        return generated[torch.argsort(index)]

    def __call__(self, step: int) -> dict:
        ref = self._reference_vectors()
        generated = self.generate_all()
        metrics = method_metrics("dit", generated, ref["x1"], ref["text"])
        if self.baselines:
            metrics.update(method_metrics("ceiling", ref["own"], ref["x1"], ref["text"]))
            if ref["linear"] is not None:
                metrics.update(method_metrics("linear", ref["linear"], ref["x1"], ref["text"]))
        metrics["eval_samples"] = float(generated.shape[0])
        if self.log_table and (not dist.is_initialized() or dist.get_rank() == 0):
            log.info("%s", format_table(metrics, step, f"{self.sampler} {self.num_steps} steps, guidance "
                                                        f"{self.guidance_scale:g}"))
        return metrics


LABELS = {"dit": "DiT, generated", "ceiling": "target tower's own embedding", "linear": "linear map of mean-pooled cond."}


def format_table(metrics: dict, step: int, sampler: str = "") -> str:
    columns = ("cosine", "target_R@1", "target_R@5", "text_R@1", "text_R@5")
    lines = [f"evaluation at step {step} on {int(metrics.get('eval_samples', 0))} samples ({sampler}):",
             f"  {'':32s}" + "".join(f"{c:>12s}" for c in columns)]
    for name in METHODS:
        if f"{name}_cosine" not in metrics:
            continue
        cells = "".join(f"{metrics[f'{name}_{c}']:12.4f}" if f"{name}_{c}" in metrics else f"{'-':>12s}"
                        for c in columns)
        lines.append(f"  {LABELS[name]:32s}{cells}")
    return "\n".join(lines)
