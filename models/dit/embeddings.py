"""The on-disk form of extracted embeddings: safetensors chunks (never pickle) and a manifest.

    <dir>/settings.json                 what the extraction was asked to do (towers, layers, dtype, sources);
                                        a resume with other settings is refused, naming the difference
    <dir>/projection.safetensors        the target tower's visual projection, "weight" [output_dim, target_width]
    <dir>/chunks/<name>.safetensors     one chunk: "condition" [n, P, Dc], "target_patches" [n, Pt, Dt],
                                        "target_embedding" [n, d] (the target tower's own image embedding),
                                        "text_embedding" [n, d] (the target CLIP's caption embedding, optional);
                                        metadata "keys" and "captions" (JSON lists, in row order)
    <dir>/chunks/<name>.json            the chunk's record (count, sha256, bytes, source shard, part),
                                        written after the chunk file is in place: a chunk without a
                                        record is partial (an interrupted write) and is extracted again
    <dir>/shards/<index>.json           a source shard is done: its parts and sample count
    <dir>/manifest.json                 written last: counts, shapes, dtypes, source shards, tower
                                        configs, and every chunk's record in order (global offsets)

Chunks are named `s<shard index>-p<part>`: part k of a source shard holds its samples
[k * samples_per_chunk, (k + 1) * samples_per_chunk), so a resumed extraction recomputes exactly
the missing parts, with neither duplicates nor gaps.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

FORMAT, VERSION = "dit-embeddings", 1
MANIFEST, SETTINGS, PROJECTION = "manifest.json", "settings.json", "projection.safetensors"
CHUNK_DIR, SHARD_DIR = "chunks", "shards"
TENSOR_NAMES = ("condition", "target_patches", "target_embedding", "text_embedding")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class EmbeddingDataError(ValueError):
    """A missing, partial or corrupt piece of an extraction directory (the message names it)."""


def chunk_name(shard_index: int, part: int) -> str:
    return f"s{shard_index:06d}-p{part:04d}"


def sha256_file(path: str, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            data = fh.read(block)
            if not data:
                return digest.hexdigest()
            digest.update(data)


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: str, what: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise EmbeddingDataError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise EmbeddingDataError(f"{what} {path} is unreadable: {exc}") from None


def write_chunk(directory: str, name: str, tensors: dict, keys: list, captions: list, extra: dict,
                before_record=None) -> dict:
    """Write chunk `name` atomically (temporary file, fsync, rename), then its record; returns the
    record. `before_record(name)` runs in between (tests inject a crash there: the worst moment)."""
    from safetensors.torch import save_file

    chunk_dir = os.path.join(directory, CHUNK_DIR)
    os.makedirs(chunk_dir, exist_ok=True)
    path = os.path.join(chunk_dir, name + ".safetensors")
    tmp = f"{path}.tmp{os.getpid()}"
    counts = {k: int(v.shape[0]) for k, v in tensors.items()}
    if len(set(counts.values())) != 1 or len(keys) != next(iter(counts.values())) or len(captions) != len(keys):
        raise ValueError(f"chunk {name}: row counts differ {counts}, {len(keys)} keys, {len(captions)} captions")
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise EmbeddingDataError(f"chunk {name}: {key} has non-finite values in {value.dtype}; extract with "
                                     "--dtype bfloat16 or float32")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
              metadata={"keys": json.dumps(keys), "captions": json.dumps(captions), "name": name})
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    if before_record is not None:
        before_record(name)
    record = {"name": name, "file": f"{CHUNK_DIR}/{name}.safetensors", "count": len(keys),
              "bytes": os.path.getsize(path), "sha256": sha256_file(path), **extra}
    write_json_atomic(os.path.join(chunk_dir, name + ".json"), record)
    return record


def check_chunk(directory: str, record: dict, checksum: bool = True) -> str | None:
    """What is wrong with a chunk on disk against its record, or None."""
    path = os.path.join(directory, record["file"])
    if not os.path.exists(path):
        return f"chunk {record['name']}: {path} is missing"
    size = os.path.getsize(path)
    if size != record["bytes"]:
        return f"chunk {record['name']}: {path} has {size} bytes, the record says {record['bytes']} (truncated or rewritten)"
    if checksum and sha256_file(path) != record["sha256"]:
        return f"chunk {record['name']}: {path} fails its sha256 check (corrupt)"
    return None


def load_chunk_record(directory: str, name: str) -> dict | None:
    path = os.path.join(directory, CHUNK_DIR, name + ".json")
    if not os.path.exists(path):
        return None
    try:
        return read_json(path, "chunk record")
    except EmbeddingDataError:
        return None  # a record cut short: the chunk is extracted again


def write_manifest(directory: str, chunk_names: list[str], tensors: dict, *, condition_grid, target_grid,
                   towers: dict, source_shards: list, projection: dict | None, **extra) -> dict:
    """manifest.json from the chunks' records, in the order given, with global offsets (written
    last: its presence means the extraction is complete). `tensors`: name -> {"shape" (per
    sample), "dtype"}."""
    chunks, offset = [], 0
    for name in chunk_names:
        record = load_chunk_record(directory, name)
        if record is None:
            raise EmbeddingDataError(f"chunk {name} has no record: the extraction did not finish")
        chunks.append({**record, "offset": offset})
        offset += record["count"]
    manifest = {"format": FORMAT, "version": VERSION, "num_samples": offset, "num_chunks": len(chunks),
                "tensors": tensors, "condition_grid": list(condition_grid), "target_grid": list(target_grid),
                "towers": towers, "source_shards": list(source_shards), "projection": projection, "chunks": chunks,
                **extra}
    write_json_atomic(os.path.join(directory, MANIFEST), manifest)
    return manifest


def write_projection(directory: str, weight: torch.Tensor) -> dict:
    """The target tower's visual projection [output_dim, width] as projection.safetensors; its manifest entry."""
    from safetensors.torch import save_file

    path = os.path.join(directory, PROJECTION)
    weight = weight.detach().float().cpu().contiguous()
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({"weight": weight}, tmp)
    os.replace(tmp, path)
    return {"file": PROJECTION, "sha256": sha256_file(path), "shape": list(weight.shape)}


@dataclass
class ChunkRef:
    name: str
    path: str
    count: int
    offset: int  # global index of the chunk's first sample


class EmbeddingSet:
    """A finished extraction directory: the manifest, its chunks, rows by global sample index."""

    def __init__(self, directory: str, verify_checksums: bool = False):
        self.directory = directory
        self.manifest = read_json(os.path.join(directory, MANIFEST), "embedding manifest")
        if self.manifest.get("format") != FORMAT:
            raise EmbeddingDataError(f"{directory}/{MANIFEST} is not a {FORMAT} manifest (written by "
                                     "examples/extract_embeddings.py)")
        problems = [p for p in (check_chunk(directory, r, verify_checksums) for r in self.manifest["chunks"]) if p]
        if problems:
            raise EmbeddingDataError(f"{directory}: {len(problems)} bad chunks; rerun examples/extract_embeddings.py "
                                     "with the same arguments to extract them again:\n  " + "\n  ".join(problems[:10]))
        self.chunks = [ChunkRef(r["name"], os.path.join(directory, r["file"]), r["count"], r["offset"])
                       for r in self.manifest["chunks"]]
        self.num_samples = int(self.manifest["num_samples"])
        self.tensors = self.manifest["tensors"]
        self._handles: dict = {}

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple:
        return tuple(self.tensors[name]["shape"])

    def _handle(self, chunk: ChunkRef):
        from safetensors import safe_open

        if chunk.name not in self._handles:
            try:
                self._handles[chunk.name] = safe_open(chunk.path, framework="pt")
            except Exception as exc:  # noqa: BLE001 - a damaged header
                raise EmbeddingDataError(f"chunk {chunk.name}: {chunk.path} is unreadable: {exc}") from None
        return self._handles[chunk.name]

    def read(self, chunk_index: int, start: int, stop: int, names) -> dict:
        """Rows [start, stop) of chunk `chunk_index` (float32)."""
        chunk = self.chunks[chunk_index]
        handle = self._handle(chunk)
        try:
            return {n: handle.get_slice(n)[start:stop].float() for n in names}
        except Exception as exc:  # noqa: BLE001
            raise EmbeddingDataError(f"chunk {chunk.name}: cannot read rows {start}:{stop} of {names}: {exc}") from None

    def read_rows(self, chunk_index: int, rows: list[int], names) -> dict:
        """Arbitrary rows of one chunk, in the order given (contiguous runs read together)."""
        if not rows:
            return {n: torch.zeros(0, *self.shape(n)) for n in names}
        pieces, run_start, prev = [], rows[0], rows[0]
        for r in rows[1:] + [None]:
            if r is not None and r == prev + 1:
                prev = r
                continue
            pieces.append(self.read(chunk_index, run_start, prev + 1, names))
            if r is not None:
                run_start = prev = r
        return {n: torch.cat([p[n] for p in pieces]) for n in names}

    def metadata(self, chunk_index: int) -> dict:
        meta = self._handle(self.chunks[chunk_index]).metadata() or {}
        return {"keys": json.loads(meta.get("keys", "[]")), "captions": json.loads(meta.get("captions", "[]"))}

    def captions(self) -> list[str]:
        return [c for i in range(len(self.chunks)) for c in self.metadata(i)["captions"]]

    def projection(self) -> torch.Tensor | None:
        """The target tower's visual projection [output_dim, target_width], or None."""
        from safetensors.torch import load_file

        info = self.manifest.get("projection")
        if info is None:
            return None
        path = os.path.join(self.directory, info["file"])
        if not os.path.exists(path) or (info.get("sha256") and sha256_file(path) != info["sha256"]):
            raise EmbeddingDataError(f"{path}: missing or fails its sha256 check")
        return load_file(path)["weight"].float()

    def read_all(self, names, limit: int | None = None) -> dict:
        """Every row (up to `limit`) of `names`, in global order (evaluation sets, baselines)."""
        out, left = {n: [] for n in names}, self.num_samples if limit is None else min(limit, self.num_samples)
        for i, chunk in enumerate(self.chunks):
            if left <= 0:
                break
            part = self.read(i, 0, min(chunk.count, left), names)
            for n in names:
                out[n].append(part[n])
            left -= min(chunk.count, left)
        return {n: torch.cat(v) if v else torch.zeros(0, *self.shape(n)) for n, v in out.items()}


def verify_directory(directory: str, checksums: bool = True) -> list[str]:
    """Every problem of an extraction directory (an empty list when it is complete and intact)."""
    try:
        manifest = read_json(os.path.join(directory, MANIFEST), "embedding manifest")
    except EmbeddingDataError as exc:
        return [str(exc)]
    problems = [p for p in (check_chunk(directory, r, checksums) for r in manifest.get("chunks", [])) if p]
    offsets = [r["offset"] for r in manifest.get("chunks", [])]
    counts = [r["count"] for r in manifest.get("chunks", [])]
    expected = [sum(counts[:i]) for i in range(len(counts))]
    if offsets != expected or sum(counts) != manifest.get("num_samples"):
        problems.append(f"{directory}/{MANIFEST}: chunk offsets or the sample count do not add up")
    info = manifest.get("projection")
    if info is not None:
        path = os.path.join(directory, info["file"])
        if not os.path.exists(path) or (checksums and sha256_file(path) != info["sha256"]):
            problems.append(f"{path}: missing or fails its sha256 check")
    return problems
