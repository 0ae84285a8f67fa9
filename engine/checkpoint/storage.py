"""On-disk form of a checkpoint and the atomic commit around it.

A checkpoint is a directory `step_000001000/`:

    meta.json         what is inside: step, samples, layout at save time, the full config (YAML),
                      scheduler / loss scaler / trainer counters, and one line per canonical tensor
                      (global shape, dtype, tensor-parallel dim) -- read by `inspect` without data
    .metadata         torch.distributed.checkpoint (DCP) index: every tensor's chunks (global
                      offsets and sizes) and where each chunk lies in which file
    __<rank>_0.distcp the data each rank wrote (its own boxes; replicated tensors once)
    COMPLETE          the marker, written last: every file's size and CRC32

Tensors are stored under canonical names with global offsets, so any TP/PP/DP layout can read the
boxes it needs (DCP computes the overlaps); small per-rank objects (RNG states, data-pipeline
positions) are pickled items under keys that name their owner.

Commit: all ranks write into `.step_000001000.tmp/`; after DCP has finished (its metadata is
written once every rank's files are fsynced) each rank checksums its own files, rank 0 writes
`COMPLETE`, renames the directory to its final name, fsyncs, then replaces the `latest` pointer
(write `latest.tmp`, rename). A crash at any point before the rename leaves only a `.tmp`
directory, which is never loaded and is removed by the next save; a crash between the rename and
the pointer update leaves `latest` on the previous checkpoint. Old checkpoints are removed marker
first, so a half-deleted one is never taken for complete.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from engine.checkpoint.errors import CheckpointError

log = logging.getLogger("engine")

FORMAT = "megatron-engine-checkpoint"
FORMAT_VERSION = 1
META_FILE = "meta.json"
MARKER_FILE = "COMPLETE"
DCP_METADATA = ".metadata"
LATEST = "latest"
STEP_PREFIX = "step_"


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:09d}"


def tmp_dirname(step: int) -> str:
    return f".{step_dirname(step)}.tmp"


# -- boxes and planners ----------------------------------------------------------------------------
class Boxes:
    """Pieces of one canonical tensor held by this rank: [(global offsets, tensor)], where each
    tensor is the box's data (save) or where its data goes (load; a view into live memory)."""

    def __init__(self, global_shape, boxes: list):
        self.global_shape = torch.Size(global_shape)
        self.boxes = [(torch.Size(off), t) for off, t in boxes]

    def find(self, offsets) -> torch.Tensor:
        for off, tensor in self.boxes:
            if off == offsets:
                return tensor
        raise KeyError(offsets)


class _SavePlanner(DefaultSavePlanner):
    """DCP's default global planning (dedup of replicated boxes, coverage checks) over `Boxes`."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        items = []
        for fqn, obj in self.state_dict.items():
            if isinstance(obj, Boxes):
                for off, tensor in obj.boxes:
                    chunk = ChunkStorageMetadata(offsets=off, sizes=tensor.size())
                    items.append(WriteItem(
                        index=MetadataIndex(fqn, off), type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(tensor),
                                                    size=obj.global_shape)))
            else:
                items.append(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO))
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        return obj.find(index.offset) if isinstance(obj, Boxes) else obj


class _LoadPlanner(DefaultLoadPlanner):
    """Reads exactly the boxes asked for; pickled objects land back in the state dict."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False, allow_partial_load=True)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.state_dict = self.original_state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        requests = []
        for fqn, obj in self.state_dict.items():
            md = self.metadata.state_dict_metadata.get(fqn)
            if md is None:
                raise CheckpointError(f"{fqn}: not in the checkpoint")
            if isinstance(obj, Boxes):
                if not isinstance(md, TensorStorageMetadata):
                    raise CheckpointError(f"{fqn}: stored as an object, asked for as a tensor")
                chunks = [ChunkStorageMetadata(offsets=off, sizes=t.size()) for off, t in obj.boxes]
                requests += create_read_items_for_chunk_list(fqn, md, chunks)
            else:
                if not isinstance(md, BytesStorageMetadata):
                    raise CheckpointError(f"{fqn}: stored as a tensor, asked for as an object")
                requests.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(fqn),
                                         dest_offsets=torch.Size((0,)), storage_index=MetadataIndex(fqn),
                                         storage_offsets=torch.Size((0,)), lengths=torch.Size((0,))))
        return LoadPlan(requests)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=False)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn].boxes[index.index][1]




def write_state(path: str, state: dict, group=None):
    """Collective over `group` (or one process without torch.distributed): write `state`
    ({name: Boxes | picklable}) into directory `path`; returns DCP's metadata."""
    writer = dcp.FileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=False)
    return dcp.save(state, storage_writer=writer, planner=_SavePlanner(), process_group=group,
                    no_dist=not dist.is_initialized())


def read_state(path: str, state: dict, group=None) -> dict:
    """Collective: fill the `Boxes` of `state` in place and replace object entries by their stored
    values; returns `state`."""
    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), planner=_LoadPlanner(), process_group=group,
                 no_dist=not dist.is_initialized())
    except CheckpointError:
        raise
    except Exception as exc:  # DCP wraps per-rank failures; keep the message, name the checkpoint
        raise CheckpointError(f"reading checkpoint {path} failed: {exc}") from exc
    return state


def read_dcp_metadata(path: str):
    file = os.path.join(path, DCP_METADATA)
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file}: missing (not a complete checkpoint)") from exc
    except Exception as exc:  # noqa: BLE001 - a truncated pickle raises many kinds of errors
        raise CheckpointError(f"{file}: unreadable ({type(exc).__name__}: {exc})") from exc


# -- files, checksums, markers -------------------------------------------------------------------
def file_crc32(path: str, block: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            crc = zlib.crc32(chunk, crc)
    return crc


def describe_files(path: str, names: list[str]) -> dict:
    return {name: {"size": os.path.getsize(os.path.join(path, name)), "crc32": file_crc32(os.path.join(path, name))}
            for name in names}


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing ({what})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt {what} ({exc})") from exc


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER_FILE))


def verify_files(path: str, checksums: bool = True, names: list[str] | None = None) -> list[str]:
    """Problems with the files listed in the marker (missing, truncated, checksum mismatch), each
    naming its file; `names` restricts the check to some of them."""
    marker = read_json(os.path.join(path, MARKER_FILE), "completion marker")
    problems = []
    for name, info in sorted(marker["files"].items()):
        if names is not None and name not in names:
            continue
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            problems.append(f"{file}: missing")
            continue
        size = os.path.getsize(file)
        if size != info["size"]:
            problems.append(f"{file}: {size} bytes, {info['size']} were written (truncated or overwritten)")
        elif checksums and file_crc32(file) != info["crc32"]:
            problems.append(f"{file}: checksum mismatch (corrupt)")
    return problems


def commit(root: str, tmp: str, final_name: str, files: dict, step: int, point_latest: bool = True) -> str:
    """Rank 0, after every rank's data is written: marker, rename, and (unless `point_latest` is
    False: the caller moves it later, or never) the pointer. Returns the final path."""
    write_json_atomic(os.path.join(tmp, MARKER_FILE), {"format": FORMAT, "step": step, "files": files})
    fsync_dir(tmp)
    final = os.path.join(root, final_name)
    if os.path.exists(final):  # an incomplete leftover (a complete one is never rewritten)
        remove_checkpoint(final)
    os.rename(tmp, final)
    fsync_dir(root)
    if point_latest:
        update_latest(root, final_name)
    return final


def update_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, LATEST + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(root, LATEST))
    fsync_dir(root)


def read_latest(root: str) -> str | None:
    """The checkpoint `latest` names, if that one is complete; otherwise the newest complete one."""
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as fh:
            name = fh.read().strip()
        if name and is_complete(os.path.join(root, name)):
            return os.path.join(root, name)
        log.warning("checkpoint pointer %s names %r, which is not a complete checkpoint; using the newest "
                    "complete one instead", pointer, name)
    complete = list_complete(root)
    return complete[-1] if complete else None


def list_complete(root: str) -> list[str]:
    """Complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(STEP_PREFIX) and is_complete(os.path.join(root, n)))
    return [os.path.join(root, n) for n in names]


def remove_checkpoint(path: str) -> None:
    """Marker first, so a half-removed checkpoint never looks complete."""
    marker = os.path.join(path, MARKER_FILE)
    if os.path.exists(marker):
        os.remove(marker)
        fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)


def prune(root: str, keep_last: int) -> list[str]:
    """Remove complete checkpoints beyond the newest `keep_last` (never the one `latest` names) and
    leftover temporary directories. Returns what was removed."""
    removed = []
    if keep_last > 0:
        latest = read_latest(root)
        for path in list_complete(root)[:-keep_last]:
            if latest is not None and os.path.samefile(path, latest):
                continue
            remove_checkpoint(path)
            removed.append(path)
    return removed


def remove_stale_tmp(root: str) -> None:
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith("." + STEP_PREFIX) and name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
