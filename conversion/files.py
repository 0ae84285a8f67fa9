"""Read and write flat tensor state dicts: `.safetensors`, or torch pickles (`.pt`, `.pth`, `.bin`).

A missing, truncated or corrupt file raises `CheckpointFileError` naming the file.
"""
from __future__ import annotations

import os
import zipfile
from typing import Mapping

import torch

from conversion.clip_layout import CheckpointFileError, describe_file_error

SAFETENSORS_SUFFIX = ".safetensors"


def load_tensor_file(path: str | os.PathLike) -> dict:
    """A flat name -> tensor dict from one file.

    Accepts what open_clip's `load_state_dict` accepts: a plain state dict, a training checkpoint
    holding it under `state_dict`, names prefixed `module.` (DDP), and OpenAI's TorchScript archives.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointFileError(path, "no such file" if not os.path.exists(path) else "not a regular file")
    if path.endswith(SAFETENSORS_SUFFIX):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors is a test/convert dependency
            raise ImportError("reading .safetensors needs the `safetensors` package (pip install safetensors)") from exc
        try:
            state = load_file(path, device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise describe_file_error(path, exc) from exc
    else:
        state = _load_torch_file(path)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointFileError(path, f"holds a {type(state).__name__}, not a state dict")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_torch_file(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/UnpicklingError/EOFError/...
        if _is_torchscript(path):
            try:
                state = torch.jit.load(path, map_location="cpu").state_dict()
            except Exception as jit_exc:  # noqa: BLE001
                raise describe_file_error(path, jit_exc) from jit_exc
            for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI's archives
                state.pop(key, None)
            return state
        raise describe_file_error(path, exc) from exc


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """Contiguous and owning its whole storage (safetensors refuses views of larger storages)."""
    tensor = tensor.detach().contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def save_tensor_file(state: Mapping, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write `state` (tensors only) as safetensors (by the suffix) or with `torch.save`."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {k: _own_storage(v) for k, v in state.items()}
    tmp = path + ".tmp"
    if path.endswith(SAFETENSORS_SUFFIX):
        from safetensors.torch import save_file

        save_file(tensors, tmp, metadata=metadata or {"format": "pt"})
    else:
        torch.save(tensors, tmp)
    os.replace(tmp, path)  # never leave a half-written file under the final name
