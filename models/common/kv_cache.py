"""A key/value cache for incremental decoding, filled by the sdpa core attention.

Megatron's attention computes this step's queries, keys and values (rotary embedding applied) and
hands them to the core attention; while a cache is active (`with cache.active():`), the sdpa core
attention writes this step's keys and values into the cache at the current length and attends over
everything cached so far. Each TP rank caches its own key/value heads. The caller (generation)
passes the attention mask for the whole cached length and calls `advance(n)` after each forward.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("kv_cache", default=None)


def active_kv_cache() -> KVCache | None:
    return _ACTIVE.get()


class KVCache:
    """Preallocated per-layer buffers [max_length, batch, kv_heads_per_rank, head_dim], by the
    layer's global 1-based `layer_number`."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.length = 0  # tokens cached and committed (`advance`)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def active(self):
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def update(self, layer_number: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's key/value [n, b, heads, d] after the committed length; return the keys
        and values of all positions so far [length + n, b, heads, d]."""
        n = key.shape[0]
        end = self.length + n
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; this step needs {end}")
        if layer_number not in self.keys:
            shape = (self.max_length, *key.shape[1:])
            self.keys[layer_number] = key.new_empty(shape)
            self.values[layer_number] = value.new_empty(shape)
        self.keys[layer_number][self.length:end] = key
        self.values[layer_number][self.length:end] = value
        return self.keys[layer_number][:end], self.values[layer_number][:end]

    def advance(self, n: int) -> None:
        self.length += n
