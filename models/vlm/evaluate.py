"""VLM evaluation: validation loss on the response tokens and answer accuracy per question type.

Accuracy is exact match under teacher forcing: a conversation counts as answered when the argmax
of every response position (its end-of-turn token included) is the reference token. That is the
answer greedy decoding would produce (greedy decoding stops being right exactly where the first
argmax differs), without running generation's token-by-token loop through the pipeline.

Every rank reads the same eval stream and DP rank r runs batches r, r + DP, ...; sums are reduced
over DP and PP, so every rank reports the same numbers, whatever the layout.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.schedules import pipelined_forward


def answer_hits(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[b] bool: every response position's argmax equals its label (logits [b, s, V])."""
    wrong = (logits.argmax(-1) != labels) & (loss_mask > 0)
    return ~wrong.any(dim=1) & (loss_mask > 0).any(dim=1)


def make_eval_fn(cfg, ctx, model, make_loader, link, qtypes: tuple):
    """step -> {"val_loss", "val_accuracy", "accuracy/<type>", ...}; `make_loader()` a fresh
    finite eval loader (DP-unsharded)."""
    index = {q: i for i, q in enumerate(qtypes)}

    def evaluate(step: int) -> dict:
        model.eval()
        # [nll sum, tokens, answered, asked] and per type [answered, asked]
        sums = torch.zeros(4 + 2 * len(qtypes), dtype=torch.float64, device=ctx.device)
        with torch.no_grad():
            for i, batch in enumerate(make_loader()):
                if cfg.eval.num_batches and i >= cfg.eval.num_batches:
                    break
                if i % ctx.dims.dp != ctx.dp_rank:
                    continue
                b = {k: v.to(ctx.device) for k, v in batch.items() if torch.is_tensor(v)}
                out = pipelined_forward(model, link, model.stage_forward, b["tokens"], b["images"], b["image_index"],
                                        b["labels"], b["loss_mask"], True)
                if out is None:
                    continue
                count = b["loss_mask"].sum().double()
                sums[0] += out["loss"].double() * count
                sums[1] += count
                hits = answer_hits(model.llm.gather_logits(out["logits"]), b["labels"], b["loss_mask"])
                sums[2] += hits.sum()
                sums[3] += hits.numel()
                for row, types in enumerate(batch["qtypes"]):
                    if types and types[0] in index:  # one question per eval conversation
                        sums[4 + 2 * index[types[0]]] += hits[row].double()
                        sums[5 + 2 * index[types[0]]] += 1
        model.train()
        if link is not None:
            dist.all_reduce(sums, group=ctx.pp_group)
        dist.all_reduce(sums, group=ctx.dp_group)
        metrics = {"val_loss": sums[0].item() / max(sums[1].item(), 1.0),
                   "val_accuracy": sums[2].item() / max(sums[3].item(), 1.0)}
        for q, i in index.items():
            if sums[5 + 2 * i] > 0:
                metrics[f"accuracy/{q}"] = sums[4 + 2 * i].item() / sums[5 + 2 * i].item()
        return metrics

    return evaluate
