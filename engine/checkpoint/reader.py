"""Read a checkpoint in one process, one tensor at a time, without torch.distributed: for tools
(`inspect`, `reshard`, conversion) and tests. Only the chunks of the tensor asked for are read."""
from __future__ import annotations

import io
import os

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from engine.checkpoint.storage import (
    FORMAT,
    MARKER_FILE,
    META_FILE,
    CheckpointError,
    is_complete,
    read_dcp_metadata,
    read_json,
    verify_files,
)


class CheckpointReader:
    def __init__(self, path: str, verify: bool = True, checksums: bool = True):
        """`path`: a checkpoint directory, or a checkpoint root (its `latest`)."""
        from engine.checkpoint.manager import resolve_checkpoint

        self.path = resolve_checkpoint(path)
        self.meta = read_json(os.path.join(self.path, META_FILE), "checkpoint description")
        if self.meta.get("format") != FORMAT:
            raise CheckpointError(f"{os.path.join(self.path, META_FILE)}: not a {FORMAT} checkpoint")
        if verify:
            problems = verify_files(self.path, checksums=checksums)
            if problems:
                raise CheckpointError("checkpoint files are damaged:\n  " + "\n  ".join(problems))
        self.dcp = read_dcp_metadata(self.path)

    @property
    def complete(self) -> bool:
        return is_complete(self.path)

    @property
    def tensors(self) -> dict:
        """key -> {"shape", "dtype", "partition_dim", "padded"} (from meta.json)."""
        return self.meta["tensors"]

    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self.tensors if k.startswith(prefix)]

    def chunks(self, key: str) -> list:
        md = self.dcp.state_dict_metadata.get(key)
        if md is None or isinstance(md, BytesStorageMetadata):
            raise CheckpointError(f"{key}: no such tensor in {self.path}")
        return md.chunks

    def _read_item(self, index: MetadataIndex) -> bytes:
        info = self.dcp.storage_data[index]
        file = os.path.join(self.path, info.relative_path)
        try:
            with open(file, "rb") as fh:
                fh.seek(info.offset)
                data = fh.read(info.length)
        except OSError as exc:
            raise CheckpointError(f"{file}: cannot read ({exc})") from exc
        if len(data) != info.length:
            raise CheckpointError(f"{file}: truncated (item {index.fqn} ends past the end of the file)")
        return data

    def read_tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole canonical tensor `key`."""
        md = self.dcp.state_dict_metadata.get(key)
        if md is None or isinstance(md, BytesStorageMetadata):
            raise CheckpointError(f"{key}: no such tensor in {self.path}")
        out = torch.empty(tuple(md.size), dtype=dtype or md.properties.dtype)
        for i, chunk in enumerate(md.chunks):
            index = MetadataIndex(key, chunk.offsets, i)
            try:
                piece = torch.load(io.BytesIO(self._read_item(index)), map_location="cpu", weights_only=True)
            except CheckpointError:
                raise
            except Exception as exc:  # noqa: BLE001
                file = os.path.join(self.path, self.dcp.storage_data[index].relative_path)
                raise CheckpointError(f"{file}: corrupt data for {key} ({type(exc).__name__}: {exc})") from exc
            view = out
            for dim, (off, size) in enumerate(zip(chunk.offsets, chunk.sizes)):
                view = view.narrow(dim, off, size)
            view.copy_(piece)
        return out

    def read_object(self, key: str):
        md = self.dcp.state_dict_metadata.get(key)
        if not isinstance(md, BytesStorageMetadata):
            raise CheckpointError(f"{key}: no such object in {self.path}")
        return torch.load(io.BytesIO(self._read_item(MetadataIndex(key))), weights_only=False)

    def objects(self) -> list[str]:
        return sorted(k for k, v in self.dcp.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))

    def marker(self) -> dict:
        return read_json(os.path.join(self.path, MARKER_FILE), "completion marker")
