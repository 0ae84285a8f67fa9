"""WebDataset image-caption pipeline: shards split over data-parallel ranks, shuffled, decoded,
transformed, tokenized and batched.

Shards are split over DP ranks only: the TP and PP ranks of one replica pass the same `dp_rank`
and seed, so they read the same samples in the same order with the same crops. A missing or corrupt
shard, or a sample that does not decode, is skipped with a warning that names it and counted in
`stats`; if no shard of an epoch yields a usable sample the pipeline raises instead of spinning
forever.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field

import torch
from braceexpand import braceexpand
from PIL import Image
from webdataset.tariterators import tarfile_samples

from data.sample_index import sample_index_from_key
from data.transforms import ImageTransform

log = logging.getLogger(__name__)


def expand_shards(spec) -> list[str]:
    """Shards from a brace pattern ('dir/train-{000000..000019}.tar'), a glob, a directory or a list."""
    if isinstance(spec, (list, tuple)):
        return [s for item in spec for s in expand_shards(item)]
    if os.path.isdir(spec):
        found = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not found:
            raise FileNotFoundError(f"no .tar shards in directory {spec!r}")
        return found
    out = []
    for item in braceexpand(spec):
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        out.extend(matches)
    if not out:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return out


def split_shards_for_dp(shards: list[str], dp_rank: int, dp_size: int) -> list[str]:
    """Round-robin shards over DP ranks; each rank gets a disjoint, non-empty subset.

    When the shard count is not a multiple of dp_size, ranks get one shard more or less; training
    loaders loop forever, so ranks still step together (their epochs just end at different steps).
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is outside 0..{dp_size - 1} (dp_size={dp_size})")
    if len(shards) < dp_size:
        raise ValueError(f"{len(shards)} shards cannot be split over {dp_size} data-parallel ranks: "
                         f"write at least {dp_size} shards (smaller shards) or lower the DP size")
    return shards[dp_rank::dp_size]


@dataclass
class PipelineStats:
    """Counters of one rank's loader. With num_workers > 0 the skip counters stay in the worker
    processes (their warnings still print) and read 0 here; samples_seen stays exact."""

    samples_seen: int = 0  # samples delivered in batches on this rank
    samples_skipped: int = 0  # samples that did not decode (bad jpeg, missing txt, ...)
    shards_skipped: int = 0  # shard reads that failed (missing file, truncated tar); once per epoch


def read_tar_shard(url: str, stats: PipelineStats):
    """Raw samples (dicts of member bytes) of one WebDataset tar shard; a shard that fails is
    logged and counted in `stats.shards_skipped`, the good samples read before the failure kept."""
    failed = []

    def handler(exn):
        failed.append(exn)
        return True  # keep going: samples read before the failure are still used

    yield from tarfile_samples(iter([{"url": url}]), handler=handler)
    if failed:
        stats.shards_skipped += 1
        log.warning("skipped unreadable shard %s: %r (%d shard reads skipped so far)", url, failed[0],
                    stats.shards_skipped, extra={"per_replica": True})


IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TEXT_KEYS = ("txt", "text", "caption")


def _first_key(raw: dict, keys) -> str | None:
    return next((k for k in keys if k in raw), None)


class ImageTextStream(torch.utils.data.IterableDataset):
    """Decoded {'images', 'tokens'[, 'class_index']} samples from this rank's shards.

    Raw tar members (bytes) go through the shuffle buffer and are decoded on the way out, so the
    buffer holds compressed images, not tensors.
    """

    def __init__(self, shards: list[str], tokenizer, image_transform, context_length: int,
                 shuffle_buffer: int, seed: int, dp_rank: int, infinite: bool, stats: PipelineStats,
                 with_sample_index: bool = False):
        super().__init__()
        self.with_sample_index = with_sample_index
        self.shards, self.tokenizer, self.transform = list(shards), tokenizer, image_transform
        self.context_length, self.shuffle_buffer, self.infinite = context_length, shuffle_buffer, infinite
        self.seed, self.dp_rank, self.stats = seed, dp_rank, stats
        self.position: StreamPosition | None = None  # of the running stream (in-process iteration only)
        self.resume_from: dict | None = None  # a saved position, taken by the next iteration
        self.seed_suffix, self.start_epoch = "", 0  # approximate resume: a fresh stream

    def _read_shard(self, url: str):
        return read_tar_shard(url, self.stats)

    def _skip(self, raw: dict, reason: str) -> None:
        self.stats.samples_skipped += 1
        log.warning("skipped sample %s:%s: %s", raw.get("__url__"), raw.get("__key__"), reason,
                    extra={"per_replica": True})

    def _usable(self, raw: dict) -> bool:
        if _first_key(raw, IMAGE_KEYS) is None or _first_key(raw, TEXT_KEYS) is None:
            self._skip(raw, f"no image ({'/'.join(IMAGE_KEYS)}) or caption "
                            f"({'/'.join(TEXT_KEYS)}) member; has {sorted(k for k in raw if not k.startswith('__'))}")
            return False
        return True

    def _raw_samples(self, worker: int, num_workers: int, pos: StreamPosition):
        """Raw samples with an image and a caption, epoch after epoch (once unless infinite), from
        `pos` on; `pos` is advanced as samples are taken, so it always says where to resume."""
        yield from epoch_samples(self.shards[worker::num_workers], pos, self._read_shard, self._usable,
                                 shuffle_key=f"{self.seed}-{self.dp_rank}-{worker}" if self.shuffle_buffer > 0 else None,
                                 infinite=self.infinite)

    def _shuffled(self, raws, pos: StreamPosition):
        yield from shuffle_buffered(raws, pos, self.shuffle_buffer)

    def _decode(self, raw: dict, rng: random.Random):
        try:
            image = Image.open(io.BytesIO(raw[_first_key(raw, IMAGE_KEYS)]))
            image.load()
            caption = raw[_first_key(raw, TEXT_KEYS)].decode("utf-8")
            meta = json.loads(raw["json"]) if "json" in raw else {}
        except Exception as exc:  # noqa: BLE001 - any broken sample is skipped, not fatal
            self._skip(raw, f"{type(exc).__name__}: {exc}")
            return None
        # Transforms that take the stream's RNG (ImageTransform, the augmentation presets) crop
        # reproducibly and resume exactly; plain callables get the image only.
        if isinstance(self.transform, ImageTransform) or getattr(self.transform, "takes_rng", False):
            images = self.transform(image, rng)
        else:
            images = self.transform(image)
        sample = {"images": images, "tokens": self.tokenizer(caption, self.context_length)[0]}
        if self.with_sample_index:  # the dataset row, for per-sample loss state (FastCLIP)
            sample["sample_index"] = torch.tensor(sample_index_from_key(str(raw.get("__key__"))), dtype=torch.long)
        if isinstance(meta, dict) and "class_index" in meta:
            sample["class_index"] = torch.tensor(int(meta["class_index"]), dtype=torch.long)
        return sample

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        pos = StreamPosition(rng=random.Random(f"{self.seed}-{self.dp_rank}-{worker}"))
        if info is None and self.resume_from is not None:
            pos = StreamPosition.from_state(self.resume_from)
            self.resume_from = None
        elif self.seed_suffix:  # an approximate resume (workers, or a changed split): a fresh stream
            pos = StreamPosition(rng=random.Random(f"{self.seed}-{self.dp_rank}-{worker}-{self.seed_suffix}"),
                                 epoch=self.start_epoch)
        self.position = pos if info is None else None
        for raw in self._shuffled(self._raw_samples(worker, num_workers, pos), pos):
            sample = self._decode(raw, pos.rng)
            if sample is not None:
                yield sample


@dataclass
class StreamPosition:
    """Where one stream is: epoch, shard (index into that epoch's order), tar samples consumed from
    it, usable samples this epoch, the shuffle buffer (raw bytes) and the RNG that shuffles and crops."""

    rng: random.Random
    epoch: int = 0
    shard_index: int = 0
    sample_index: int = 0
    usable: int = 0
    buffer: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard_index": self.shard_index, "sample_index": self.sample_index,
                "usable": self.usable, "rng": self.rng.getstate(), "buffer": list(self.buffer)}

    @classmethod
    def from_state(cls, state: dict) -> StreamPosition:
        rng = random.Random()
        rng.setstate(state["rng"])
        return cls(rng, state["epoch"], state["shard_index"], state["sample_index"], state["usable"],
                   list(state["buffer"]))


def epoch_samples(shards: list[str], pos: StreamPosition, read_shard, usable, shuffle_key: str | None,
                  infinite: bool):
    """Samples of `shards`, epoch after epoch (once unless `infinite`), from `pos` on.

    `read_shard(url)` yields a shard's raw samples (logging and counting a failure itself);
    `usable(raw)` says whether a sample counts (a skipped one is still consumed). With a
    `shuffle_key` each epoch reads the shards in its own reproducible order. `pos` is advanced as
    samples are taken, so it always says where to resume. An epoch without a single usable sample
    raises instead of looping forever over unreadable shards.
    """
    if not shards:  # more workers than shards: this worker has nothing to read
        return
    while True:
        order = list(shards)
        if shuffle_key is not None:
            random.Random(f"{shuffle_key}-epoch{pos.epoch}").shuffle(order)
        while pos.shard_index < len(order):
            url, skip = order[pos.shard_index], pos.sample_index
            for index, raw in enumerate(read_shard(url)):
                if index < skip:  # resuming inside this shard: already consumed
                    continue
                pos.sample_index = index + 1
                if not usable(raw):
                    continue
                pos.usable += 1
                yield raw
            pos.shard_index, pos.sample_index = pos.shard_index + 1, 0
        if pos.usable == 0:
            raise RuntimeError(f"no readable sample in any shard of this rank (epoch {pos.epoch}): {', '.join(order)}")
        pos.epoch, pos.shard_index, pos.usable = pos.epoch + 1, 0, 0
        if not infinite:
            return


def shuffle_buffered(items, pos: StreamPosition, size: int):
    """A shuffle buffer of `size` items (none when size <= 0), kept in `pos` with its RNG so a
    resumed stream continues exactly."""
    if size <= 0:
        yield from items
        return
    buffer, rng = pos.buffer, pos.rng
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(len(buffer))
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    while buffer:
        yield buffer.pop(0)


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
        self.batches_consumed = getattr(self, "batches_consumed", 0)
        for batch in self._batches():
            self.stats.samples_seen += batch["images"].shape[0]
            self.batches_consumed += 1
            yield batch

    # -- resumable position (checkpoints) ---------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's position, taken between batches. Exact with `num_workers=0` (the stream's
        shard/sample position, shuffle buffer and RNG); with workers the streams live in other
        processes, so only the count of batches consumed is kept (`load_state_dict` then starts a
        fresh stream)."""
        dataset = self.dataset
        state = {"version": 1, "num_shards": len(dataset.shards), "dp_rank": dataset.dp_rank,
                 "num_workers": self.num_workers, "batches_consumed": getattr(self, "batches_consumed", 0),
                 "stats": asdict(self.stats), "exact": self.num_workers == 0, "stream": None}
        if self.num_workers == 0:
            if dataset.position is not None:
                state["stream"] = dataset.position.state_dict()
            elif dataset.resume_from is not None:  # restored but not iterated yet
                state["stream"] = dataset.resume_from
        return state

    def load_state_dict(self, state: dict) -> bool:
        """Resume at `state` when the next iteration starts (call before the first batch). Returns
        True when the position is restored exactly, False when a fresh stream is started instead
        (workers, or a different shard split)."""
        dataset = self.dataset
        self.batches_consumed = state["batches_consumed"]
        for key, value in state["stats"].items():
            setattr(self.stats, key, value)
        same_split = state["num_shards"] == len(dataset.shards) and state["dp_rank"] == dataset.dp_rank
        if state["exact"] and same_split and self.num_workers == 0:
            dataset.resume_from = state["stream"]  # None: saved before the first batch, start afresh
            return True
        # No exact position: a stream with a seed of its own, past the saved epoch, so the resumed
        # run does not replay the start of the data.
        dataset.seed_suffix = f"resume{state['batches_consumed']}"
        dataset.start_epoch = (state["stream"] or {}).get("epoch", 0) + 1
        return False


def build_clip_dataloader(shards, *, dp_rank: int, dp_size: int, batch_size: int, tokenizer,
                          image_transform, context_length: int = 77, shuffle_buffer: int = 1000,
                          seed: int = 0, infinite: bool = True, num_workers: int = 0,
                          with_sample_index: bool = False) -> ClipLoader:
    """Training (`infinite=True`: endless epochs, full batches) or evaluation (one pass, last
    partial batch kept) loader over this DP rank's share of `shards`.

    Batches are dicts {"images": float [B, 3, H, W], "tokens": long [B, context_length]} plus
    "class_index": long [B] when the samples' json has it, and "sample_index": long [B] (the number
    each sample's key ends with, `data.sample_index`) with `with_sample_index`. `loader.stats` counts this rank's
    samples; with num_workers > 0 each worker reads a subset of the rank's shards, batches are
    interleaved across workers and only `samples_seen` is exact (skip counters stay in the workers).
    """
    shard_list = split_shards_for_dp(expand_shards(shards), dp_rank, dp_size)
    dataset = ImageTextStream(shard_list, tokenizer, image_transform, context_length, shuffle_buffer, seed,
                              dp_rank, infinite, PipelineStats(), with_sample_index=with_sample_index)
    return ClipLoader(dataset, batch_size, drop_last=infinite, num_workers=num_workers)
