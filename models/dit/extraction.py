"""Embedding extraction: a conditioning tower and a target CLIP tower over WebDataset images, into
chunked safetensors shards with a manifest (the format: models/dit/embeddings.py).

Data-parallel over ranks: source shard i goes to data-parallel rank i % DP; the tensor-parallel
ranks of a replica run the towers together and the first of them writes. Resumable: parts whose
chunk and record are on disk and pass their check are skipped, so a killed extraction continues
where it stopped without duplicates or gaps; a chunk whose bytes no longer match its record is
named and extracted again. The manifest is written last, by rank 0, once every shard is done.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import time

import torch
import torch.distributed as dist

from models.dit.embeddings import (
    CHUNK_DIR,
    DTYPES,
    FORMAT,
    MANIFEST,
    SETTINGS,
    SHARD_DIR,
    VERSION,
    EmbeddingDataError,
    check_chunk,
    chunk_name,
    load_chunk_record,
    read_json,
    write_chunk,
    write_json_atomic,
    write_manifest,
    write_projection,
)
from models.dit.towers import (
    LoadedTower,
    TowerSpec,
    load_tower,
    text_embeddings,
    tower_features,
)

log = logging.getLogger("engine")


def _settings(shards, condition: TowerSpec, target: TowerSpec, samples_per_chunk: int, dtype: str, text: bool) -> dict:
    return {"format": FORMAT, "version": VERSION, "source_shards": list(shards), "condition_tower": condition.describe(),
            "target_tower": target.describe(), "samples_per_chunk": samples_per_chunk, "dtype": dtype,
            "text_embeddings": text}


def check_settings(out_dir: str, settings: dict) -> None:
    """Refuse to resume into a directory extracted with other settings (naming what differs)."""
    path = os.path.join(out_dir, SETTINGS)
    if not os.path.exists(path):
        return
    old = read_json(path, "extraction settings")
    differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if differ:
        details = "; ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
        raise EmbeddingDataError(f"{out_dir} holds an extraction with other settings ({details}); use a new --out "
                                 "directory or the same arguments")


def _samples(url: str):
    """(key, PIL image, caption) of one WebDataset shard; unreadable samples are skipped with a warning."""
    from PIL import Image
    from webdataset.tariterators import tarfile_samples

    from data.pipeline import IMAGE_KEYS, TEXT_KEYS

    failed = []
    for raw in tarfile_samples(iter([{"url": url}]), handler=lambda exn: failed.append(exn) or True):
        image_key = next((k for k in IMAGE_KEYS if k in raw), None)
        text_key = next((k for k in TEXT_KEYS if k in raw), None)
        if image_key is None or text_key is None:
            log.warning("skipped sample %s:%s: no image or caption", url, raw.get("__key__"), extra={"per_replica": True})
            continue
        try:
            image = Image.open(io.BytesIO(raw[image_key]))
            image.load()
            caption = raw[text_key].decode("utf-8")
        except Exception as exc:  # noqa: BLE001 - a broken sample is skipped, not fatal
            log.warning("skipped sample %s:%s: %s", url, raw.get("__key__"), exc, extra={"per_replica": True})
            continue
        yield raw["__key__"], image, caption
    if failed:
        log.warning("source shard %s: read error %r (samples before it were used)", url, failed[0],
                    extra={"per_replica": True})


def _parts(samples, size: int):
    part = []
    for sample in samples:
        part.append(sample)
        if len(part) == size:
            yield part
            part = []
    if part:
        yield part


class Extractor:
    def __init__(self, out_dir: str, shards: list[str], condition: LoadedTower, target: LoadedTower, *, device,
                 dp_rank: int = 0, dp_size: int = 1, writer: bool = True, batch_size: int = 64,
                 samples_per_chunk: int = 1000, dtype: str = "float16", text: bool = True, before_record=None):
        from data.transforms import build_image_transform

        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        self.out_dir, self.shards, self.condition, self.target = out_dir, list(shards), condition, target
        self.device, self.dp_rank, self.dp_size, self.writer = device, dp_rank, dp_size, writer
        self.batch_size, self.samples_per_chunk, self.dtype = batch_size, samples_per_chunk, DTYPES[dtype]
        self.text = text and target.has_text
        self.before_record = before_record
        self.transforms = [build_image_transform(t.clip_cfg.vision.img_h, train=False, mean=t.clip_cfg.vision.image_mean,
                                                 std=t.clip_cfg.vision.image_std) for t in (condition, target)]
        self.stats = {"chunks_written": 0, "chunks_skipped": 0, "chunks_redone": 0, "samples": 0}

    # -- one part of one shard ----------------------------------------------------------------------
    def _compute(self, part: list) -> dict:
        rows = {"condition": [], "target_patches": [], "target_embedding": [], "text_embedding": []}
        for start in range(0, len(part), self.batch_size):
            batch = part[start:start + self.batch_size]
            cond_images = torch.stack([self.transforms[0](img) for _, img, _ in batch]).to(self.device)
            target_images = torch.stack([self.transforms[1](img) for _, img, _ in batch]).to(self.device)
            cond, _ = tower_features(self.condition, cond_images)
            patches, embedding = tower_features(self.target, target_images, want_embedding=True)
            rows["condition"].append(cond.to(self.dtype).cpu())
            rows["target_patches"].append(patches.to(self.dtype).cpu())
            rows["target_embedding"].append(embedding.cpu())
            if self.text:
                rows["text_embedding"].append(text_embeddings(self.target, [c for _, _, c in batch], self.device).cpu())
        return {k: torch.cat(v) for k, v in rows.items() if v}

    def _done(self, name: str) -> bool:
        record = load_chunk_record(self.out_dir, name)
        if record is None:
            return False
        problem = check_chunk(self.out_dir, record, checksum=True)
        if problem:
            log.warning("%s; extracting it again", problem, extra={"per_replica": True})
            self.stats["chunks_redone"] += 1
            return False
        return True

    def shard(self, index: int, url: str) -> dict:
        """Extract (the missing parts of) source shard `index`; returns its record."""
        names, count, tic = [], 0, time.time()
        for part_index, part in enumerate(_parts(_samples(url), self.samples_per_chunk)):
            name = chunk_name(index, part_index)
            names.append(name)
            count += len(part)
            if self._done(name):
                self.stats["chunks_skipped"] += 1
                continue
            tensors = self._compute(part)
            if self.writer:
                write_chunk(self.out_dir, name, tensors, [k for k, _, _ in part], [c for _, _, c in part],
                            {"shard": url, "shard_index": index, "part": part_index}, self.before_record)
            self.stats["chunks_written"] += 1
            self.stats["samples"] += len(part)
            log.info("extracted %s (%d samples, %.1f samples/s)", name, len(part), len(part) / max(1e-9, time.time() - tic),
                     extra={"per_replica": True})
            tic = time.time()
        record = {"index": index, "url": url, "chunks": names, "samples": count}
        if not names:
            log.warning("source shard %s gave no samples (missing or unreadable)", url, extra={"per_replica": True})
        if self.writer:
            write_json_atomic(os.path.join(self.out_dir, SHARD_DIR, f"{index:06d}.json"), record)
        return record

    def run(self) -> None:
        for index, url in enumerate(self.shards):
            if index % self.dp_size != self.dp_rank:
                continue
            self.shard(index, url)


def write_extraction_manifest(out_dir: str, settings: dict, condition: LoadedTower, target: LoadedTower,
                              projection: dict, text: bool) -> dict:
    """Every shard's chunks in source order (after every shard is done)."""
    names, missing, empty = [], [], []
    for index, url in enumerate(settings["source_shards"]):
        path = os.path.join(out_dir, SHARD_DIR, f"{index:06d}.json")
        if not os.path.exists(path):
            missing.append(url)
            continue
        shard = read_json(path, "shard record")
        if not shard["chunks"]:
            empty.append(url)
        names.extend(shard["chunks"])
    if missing:
        raise EmbeddingDataError(f"{len(missing)} source shards were not extracted: {', '.join(missing[:5])}")
    dtype, d = settings["dtype"], target.clip_cfg.output_dim
    (cr, cc), (tr, tc) = condition.grid, target.grid
    tensors = {"condition": {"shape": [cr * cc, condition.width], "dtype": dtype},
               "target_patches": {"shape": [tr * tc, target.width], "dtype": dtype},
               "target_embedding": {"shape": [d], "dtype": "float32"}}
    if text:
        tensors["text_embedding"] = {"shape": [d], "dtype": "float32"}
    return write_manifest(out_dir, names, tensors, condition_grid=condition.grid, target_grid=target.grid,
                          towers={"condition": condition.describe(), "target": target.describe()},
                          source_shards=settings["source_shards"], projection=projection,
                          source_shards_without_samples=empty, samples_per_chunk=settings["samples_per_chunk"],
                          written_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def extract(out_dir: str, shards: list[str], condition_spec: TowerSpec, target_spec: TowerSpec, *, device,
            dp_rank: int = 0, dp_size: int = 1, tp_rank: int = 0, rank: int = 0, batch_size: int = 64,
            samples_per_chunk: int = 1000, dtype: str = "float16", text: bool = True, before_record=None) -> dict:
    """Collective over every rank (under torch.distributed) or one process: extract `shards` into
    `out_dir` and return the manifest."""
    settings = _settings(shards, condition_spec, target_spec, samples_per_chunk, dtype, text)
    check_settings(out_dir, settings)  # every rank reads the same file: all raise or none
    _barrier()
    if rank == 0:
        os.makedirs(os.path.join(out_dir, CHUNK_DIR), exist_ok=True)
        os.makedirs(os.path.join(out_dir, SHARD_DIR), exist_ok=True)
        for stale in glob.glob(os.path.join(out_dir, CHUNK_DIR, "*.tmp*")):  # interrupted writes
            os.remove(stale)
        if os.path.exists(os.path.join(out_dir, MANIFEST)):
            os.remove(os.path.join(out_dir, MANIFEST))  # rewritten at the end
        write_json_atomic(os.path.join(out_dir, SETTINGS), settings)
    _barrier()
    condition = load_tower(condition_spec, device)
    target = load_tower(target_spec, device, with_text=text)
    if text and not target.has_text:
        log.warning("no text tower or tokenizer for the target %s: caption embeddings are not extracted "
                    "(captions are kept in every chunk; give --target-tokenizer KIND:PATH)", target_spec.source)
    extractor = Extractor(out_dir, shards, condition, target, device=device, dp_rank=dp_rank, dp_size=dp_size,
                          writer=tp_rank == 0, batch_size=batch_size, samples_per_chunk=samples_per_chunk, dtype=dtype,
                          text=text, before_record=before_record)
    extractor.run()
    _barrier()
    manifest = None
    if rank == 0:
        projection = write_projection(out_dir, target.visual.proj.weight)
        manifest = write_extraction_manifest(out_dir, settings, condition, target, projection, extractor.text)
        log.info("wrote %s: %d samples in %d chunks (%d written, %d already there, %d extracted again)",
                 os.path.join(out_dir, MANIFEST), manifest["num_samples"], manifest["num_chunks"],
                 extractor.stats["chunks_written"], extractor.stats["chunks_skipped"], extractor.stats["chunks_redone"])
    _barrier()
    if manifest is None:
        manifest = read_json(os.path.join(out_dir, MANIFEST), "embedding manifest")
    return manifest


def summarize(manifest: dict) -> str:
    return json.dumps({"num_samples": manifest["num_samples"], "num_chunks": manifest["num_chunks"],
                       "tensors": manifest["tensors"]})
