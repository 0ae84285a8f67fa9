"""Training and evaluation data of the DiT: micro-batches of conditioning patch features and target
global vectors x1 from an extraction directory (models/dit/embeddings.py).

The target x1 is the seed's: the mean over the target tower's patch features, through the target
tower's visual projection (or, with data.target=image_embedding, the tower's own class-token
embedding); then, with data.normalize_target, target_scale * x / |x| (default scale sqrt(dim):
unit variance per dimension, like the noise it is interpolated with).

Data-parallel split: rank r of DP reads the contiguous slice r of the global sample range (equal
sizes, at most DP - 1 samples left out), so each rank touches few chunks. Every epoch the rank's
chunk segments are put in a new order and the rows of every window of `mix_chunks` segments are
shuffled together, from (seed, rank, epoch): the position is (epoch, index), so resume is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.dit.embeddings import EmbeddingSet


@dataclass
class TargetSpec:
    kind: str = "mean_pooled_patches"  # or image_embedding
    normalize: bool = True
    scale: float | None = None  # None: sqrt(dim)

    @property
    def reads(self) -> str:
        return "target_patches" if self.kind == "mean_pooled_patches" else "target_embedding"


def make_targets(rows: dict, spec: TargetSpec, projection: torch.Tensor | None) -> torch.Tensor:
    """x1 [b, d] from a batch's target rows (see the module docstring)."""
    if spec.kind == "mean_pooled_patches":
        if projection is None:
            raise ValueError("data.target=mean_pooled_patches needs the target tower's projection (projection.safetensors)")
        x = rows["target_patches"].float().mean(dim=1) @ projection.T
    elif spec.kind == "image_embedding":
        x = rows["target_embedding"].float()
    else:
        raise ValueError(f"data.target={spec.kind!r}: use mean_pooled_patches or image_embedding")
    if spec.normalize:
        scale = spec.scale if spec.scale is not None else math.sqrt(x.shape[-1])
        x = scale * torch.nn.functional.normalize(x, dim=-1)
    return x


class EmbeddingLoader:
    """Endless micro-batches {"condition": [b, P, Dc], "target": [b, d], "index": [b]} of this DP rank."""

    def __init__(self, data: EmbeddingSet, target: TargetSpec, *, dp_rank: int, dp_size: int, batch_size: int,
                 seed: int, shuffle: bool = True, mix_chunks: int = 4):
        per_rank = data.num_samples // dp_size
        if per_rank < batch_size:
            raise ValueError(f"{data.directory}: {data.num_samples} samples give {per_rank} per data-parallel rank "
                             f"(DP={dp_size}), fewer than trainer.micro_batch_size={batch_size}")
        self.data, self.target, self.batch_size, self.seed, self.shuffle = data, target, batch_size, seed, shuffle
        self.dp_rank, self.dp_size, self.mix_chunks = dp_rank, dp_size, mix_chunks
        self.start, self.stop = dp_rank * per_rank, (dp_rank + 1) * per_rank
        self.projection = data.projection() if target.kind == "mean_pooled_patches" else None
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = None, None

    def _segments(self) -> list[tuple[int, int, int]]:
        """(chunk, first row, stop row) pieces of this rank's global range."""
        out = []
        for i, chunk in enumerate(self.data.chunks):
            lo, hi = max(self.start, chunk.offset), min(self.stop, chunk.offset + chunk.count)
            if lo < hi:
                out.append((i, lo - chunk.offset, hi - chunk.offset))
        return out

    def order(self, epoch: int) -> list[tuple[int, int]]:
        """(chunk, row) of every sample of this rank in epoch `epoch`'s order."""
        if self._order_epoch == epoch:
            return self._order
        segments = self._segments()
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.dp_rank) * 1009 + epoch)
        if self.shuffle:
            segments = [segments[i] for i in torch.randperm(len(segments), generator=gen).tolist()]
        order = []
        for w in range(0, len(segments), self.mix_chunks if self.shuffle else len(segments) or 1):
            window = [(c, r) for c, lo, hi in segments[w:w + self.mix_chunks] for r in range(lo, hi)]
            if self.shuffle:
                window = [window[i] for i in torch.randperm(len(window), generator=gen).tolist()]
            order.extend(window)
        self._order_epoch, self._order = epoch, order
        return order

    def read(self, picks: list[tuple[int, int]]) -> dict:
        """Rows for (chunk, row) picks, in the order given."""
        names = ("condition", self.target.reads)
        by_chunk: dict = {}
        for slot, (chunk, row) in enumerate(picks):
            by_chunk.setdefault(chunk, []).append((row, slot))
        out = {n: [None] * len(picks) for n in names}
        for chunk, rows in by_chunk.items():
            rows.sort()
            got = self.data.read_rows(chunk, [r for r, _ in rows], names)
            for j, (_, slot) in enumerate(rows):
                for n in names:
                    out[n][slot] = got[n][j]
        stacked = {n: torch.stack(v) for n, v in out.items()}
        index = torch.tensor([self.data.chunks[c].offset + r for c, r in picks], dtype=torch.long)
        return {"condition": stacked["condition"], "target": make_targets(stacked, self.target, self.projection),
                "index": index}

    def __iter__(self):
        while True:
            order = self.order(self.epoch)
            if self.index + self.batch_size > len(order):  # drop the epoch's tail: full micro-batches only
                self.epoch, self.index = self.epoch + 1, 0
                continue
            picks = order[self.index:self.index + self.batch_size]
            self.index += self.batch_size
            yield self.read(picks)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "num_samples": self.data.num_samples, "exact": True}

    def load_state_dict(self, state: dict) -> bool:
        """Exact when the saved rank had this rank's data slice; otherwise the next epoch from its start."""
        same = (state.get("exact", False) and state.get("dp_rank") == self.dp_rank and
                state.get("dp_size") == self.dp_size and state.get("num_samples") == self.data.num_samples)
        if same:
            self.epoch, self.index = int(state["epoch"]), int(state["index"])
            return True
        self.epoch, self.index = int(state.get("epoch", 0)) + 1, 0
        return False


def iter_ranges(data: EmbeddingSet, batch_size: int, names, limit: int | None = None, start: int = 0,
                stop: int | None = None, every: int = 1, offset: int = 0):
    """(global indices [b], rows) of consecutive batches of samples [start, stop) (at most `limit`),
    in order; with `every`/`offset`, only batches j with j % every == offset (a DP rank's share)."""
    stop = data.num_samples if stop is None else min(stop, data.num_samples)
    if limit is not None:
        stop = min(stop, start + limit)
    for j, lo in enumerate(range(start, stop, batch_size)):
        if j % every != offset:
            continue
        hi = min(lo + batch_size, stop)
        pieces = []
        for i, chunk in enumerate(data.chunks):
            a, b = max(lo, chunk.offset), min(hi, chunk.offset + chunk.count)
            if a < b:
                pieces.append(data.read(i, a - chunk.offset, b - chunk.offset, names))
        yield torch.arange(lo, hi), {n: torch.cat([p[n] for p in pieces]) for n in names}
