"""WebDataset image-caption pipeline: shards split over data-parallel ranks, shuffled, decoded,
transformed, tokenized and batched.

Shards are split over DP ranks only: the TP and PP ranks of one replica pass the same `dp_rank`
and seed, so they read the same samples in the same order with the same crops. A missing or corrupt
shard, or a sample that does not decode, is skipped with a warning that names it and counted in
`stats`; if no shard of an epoch yields anything the pipeline raises instead of spinning forever.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
from dataclasses import dataclass

import torch
from braceexpand import braceexpand
from PIL import Image
from webdataset.tariterators import tarfile_samples

log = logging.getLogger(__name__)


def expand_shards(spec) -> list[str]:
    """Shards from a brace pattern ('dir/train-{000000..000019}.tar'), a glob, a directory or a list."""
    if isinstance(spec, (list, tuple)):
        return [s for item in spec for s in expand_shards(item)]
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    out = []
    for item in braceexpand(spec):
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        out.extend(matches)
    if not out:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return out


def split_shards_for_dp(shards: list[str], dp_rank: int, dp_size: int) -> list[str]:
    """Round-robin shards over DP ranks; each rank gets a disjoint, non-empty subset."""
    if len(shards) < dp_size:
        raise ValueError(f"{len(shards)} shards cannot be split over {dp_size} data-parallel ranks: "
                         f"write at least {dp_size} shards (smaller shards) or lower the DP size")
    return shards[dp_rank::dp_size]


@dataclass
class PipelineStats:
    samples_seen: int = 0  # samples delivered in batches on this rank
    samples_skipped: int = 0
    shards_skipped: int = 0


class ImageTextStream(torch.utils.data.IterableDataset):
    """Decoded (image tensor, tokens[, class_index]) samples from this rank's shards."""

    def __init__(self, shards: list[str], tokenizer, image_transform, context_length: int,
                 shuffle_buffer: int, seed: int, dp_rank: int, infinite: bool, stats: PipelineStats):
        super().__init__()
        self.shards, self.tokenizer, self.transform = list(shards), tokenizer, image_transform
        self.context_length, self.shuffle_buffer, self.infinite = context_length, shuffle_buffer, infinite
        self.seed, self.dp_rank, self.stats = seed, dp_rank, stats

    def _worker_shards(self, shards: list[str]) -> list[str]:
        info = torch.utils.data.get_worker_info()
        return shards if info is None else shards[info.id::info.num_workers]

    def _read_shard(self, url: str):
        """Raw samples of one shard; a shard that fails is logged and counted, good samples kept."""
        failed = []

        def handler(exn):
            failed.append(exn)
            return True

        yield from tarfile_samples(iter([{"url": url}]), handler=handler)
        if failed:
            self.stats.shards_skipped += 1
            log.warning("skipped unreadable shard %s: %r (%d shards skipped so far)", url, failed[0],
                        self.stats.shards_skipped)

    def _decode(self, raw: dict, rng: random.Random):
        key = f"{raw.get('__url__')}:{raw.get('__key__')}"
        try:
            image = Image.open(io.BytesIO(raw["jpg"]))
            image.load()
            caption = raw["txt"].decode("utf-8")
            meta = json.loads(raw["json"]) if "json" in raw else {}
        except Exception as exc:  # noqa: BLE001 - any broken sample is skipped, not fatal
            self.stats.samples_skipped += 1
            log.warning("skipped sample %s: %s: %s", key, type(exc).__name__, exc)
            return None
        sample = {"images": self.transform(image, rng),
                  "tokens": self.tokenizer(caption, self.context_length)[0]}
        if "class_index" in meta:
            sample["class_index"] = torch.tensor(meta["class_index"], dtype=torch.long)
        return sample

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        rng = random.Random(f"{self.seed}-{self.dp_rank}-{worker}")
        buffer, epoch = [], 0
        while True:
            order = self._worker_shards(self.shards)
            if self.shuffle_buffer > 0:
                random.Random(f"{self.seed}-{self.dp_rank}-epoch{epoch}").shuffle(order)
            decoded = 0
            for url in order:
                for raw in self._read_shard(url):
                    sample = self._decode(raw, rng)
                    if sample is None:
                        continue
                    decoded += 1
                    if self.shuffle_buffer <= 0:
                        yield sample
                        continue
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(sample)
                        continue
                    index = rng.randrange(len(buffer))
                    buffer[index], sample = sample, buffer[index]
                    yield sample
            if decoded == 0 and order:
                raise RuntimeError(f"no readable sample in any shard of this rank: {', '.join(order)}")
            epoch += 1
            if not self.infinite:
                break
        rng.shuffle(buffer)
        yield from buffer


def _collate(samples: list[dict]) -> dict:
    """Stack each field; optional fields (class_index) only when every sample has them."""
    keys = set(samples[0]).intersection(*samples[1:])
    return {key: torch.stack([s[key] for s in samples]) for key in sorted(keys)}


class ClipLoader:
    """Iterable of batches {'images', 'tokens'[, 'class_index']} with `stats` for this rank."""

    def __init__(self, dataset: ImageTextStream, batch_size: int, drop_last: bool, num_workers: int):
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.num_workers = num_workers
        self.stats = dataset.stats

    def _batches(self):
        if self.num_workers == 0:
            batch = []
            for sample in self.dataset:
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield _collate(batch)
                    batch = []
            if batch and not self.drop_last:
                yield _collate(batch)
        else:
            # With workers, skip counts stay in the worker processes (their warnings still print);
            # samples_seen is counted here and stays exact.
            yield from torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size,
                                                   num_workers=self.num_workers, collate_fn=_collate,
                                                   drop_last=self.drop_last, persistent_workers=False)

    def __iter__(self):
        for batch in self._batches():
            self.stats.samples_seen += batch["images"].shape[0]
            yield batch


def build_clip_dataloader(shards, *, dp_rank: int, dp_size: int, batch_size: int, tokenizer,
                          image_transform, context_length: int = 77, shuffle_buffer: int = 1000,
                          seed: int = 0, infinite: bool = True, num_workers: int = 0) -> ClipLoader:
    """Training (`infinite=True`: endless epochs, full batches) or evaluation (one pass, last
    partial batch kept) loader over this DP rank's share of `shards`."""
    shard_list = split_shards_for_dp(expand_shards(shards), dp_rank, dp_size)
    dataset = ImageTextStream(shard_list, tokenizer, image_transform, context_length, shuffle_buffer, seed,
                              dp_rank, infinite, PipelineStats())
    return ClipLoader(dataset, batch_size, drop_last=infinite, num_workers=num_workers)
