"""Hugging Face model directories: config.json and weights (one safetensors file, or shards with a
`model.safetensors.index.json`, or pytorch_model.bin), read and written without `transformers`.

A missing, truncated or corrupt file raises `CheckpointFileError` naming it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from conversion.clip_layout import CheckpointFileError
from conversion.files import load_tensor_file, save_tensor_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # Hugging Face's save_pretrained default (5 GB)


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise CheckpointFileError(path, "no such file") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointFileError(path, f"truncated or corrupt JSON ({exc})") from exc


def write_json(content: Mapping, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def read_hf_weights(directory: str) -> dict:
    """All tensors of a HF model directory: model.safetensors, a sharded *.index.json, or
    pytorch_model.bin."""
    if not os.path.isdir(directory):
        raise CheckpointFileError(directory, "not a directory (expected a Hugging Face model directory)")
    for index_name in (INDEX_NAME, "pytorch_model.bin.index.json"):
        index_path = os.path.join(directory, index_name)
        if os.path.isfile(index_path):
            index = read_json(index_path)
            if not isinstance(index.get("weight_map"), dict):
                raise CheckpointFileError(index_path, "has no weight_map")
            state = {}
            for shard in sorted(set(index["weight_map"].values())):
                state.update(load_tensor_file(os.path.join(directory, shard)))
            missing = sorted(set(index["weight_map"]) - set(state))
            if missing:
                raise CheckpointFileError(index_path, f"lists {len(missing)} tensors its shards lack, e.g. {missing[:3]}")
            return state
    for name in (WEIGHTS_NAME, "pytorch_model.bin"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return load_tensor_file(path)
    raise CheckpointFileError(os.path.join(directory, WEIGHTS_NAME), "no such file (nor a sharded index or "
                                                                      "pytorch_model.bin) in the model directory")


def write_hf_weights(state: Mapping, directory: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write safetensors shards of at most `max_shard_bytes` (one `model.safetensors` when it all
    fits, else `model-0000i-of-0000n.safetensors` plus the index); returns the file names."""
    os.makedirs(directory, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_tensor_file(shards[0], os.path.join(directory, WEIGHTS_NAME))
        return [WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_tensor_file(shard, os.path.join(directory, name))
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, os.path.join(directory, INDEX_NAME))
    return names


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
