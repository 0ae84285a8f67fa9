"""Per-sample state (FastCLIP's moving averages u and individual temperatures) sharded over DP.

Each named state is one canonical tensor of shape [data_size], indexed by the sample index (the
dataset row a sample came from). DP rank r of K owns the contiguous block
[r * block, min((r + 1) * block, data_size)) with block = ceil(data_size / K), so a checkpoint
holds every tensor as K boxes of one global tensor and can be read back at any other K. TP (and
PP) ranks of one replica hold the same block and make the same updates.

A step touches the samples of one global batch, wherever they are owned. `gather` and `update`
are the two exchanges that make this work; both are collectives over the DP group:

- `gather(local_index)`: every rank all-gathers the batch's indices; each owner fills in the
  values of the indices it owns (zeros elsewhere) and a reduce-scatter hands every rank the values
  of its own micro-batch. The sum is exact: every entry has exactly one non-zero contributor.
- `update(global_index, values)`: given the new values of the whole global batch (which the loss
  all-gathers anyway, it needs them for its second term), each owner writes the ones it owns.
  An index that occurs twice in one global batch keeps its last occurrence (global batch order).

Why not let the rank that reads a sample own it: which rank reads which sample depends on the
shard split (and so on the DP size and the shuffle), so that ownership is neither a box of one
tensor (no resharding on load) nor stable across a resume at another DP size. The exchange costs
O(global batch) numbers per step, against the O(global batch x embedding width) feature gather.

Memory: n_states x 4 bytes x ceil(data_size / DP) per rank (the reference keeps n_states x 4 x
data_size on every rank).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from parallel.collectives import all_gather_into, reduce_scatter_into


def _world(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def block_bounds(data_size: int, world: int, rank: int) -> tuple[int, int]:
    """(offset, length) of `rank`'s contiguous block of [0, data_size)."""
    block = math.ceil(data_size / world)
    start = min(rank * block, data_size)
    return start, min(block, data_size - start)


class ShardedSampleState:
    """Named per-sample float tensors, this DP rank's block of each (see the module docstring).

    `init` maps each state name to its initial value (e.g. -inf for a log-average that has never
    been seen). `state_dict()` / `load_state_dict()` make it a `torch.distributed.checkpoint`
    `Stateful`; `shards()` exposes each tensor as (global_shape, offset, local tensor) so a sharded
    checkpoint can store it as boxes of one canonical tensor.
    """

    def __init__(self, init: dict[str, float], data_size: int, group=None, device=None,
                 dtype: torch.dtype = torch.float32):
        if data_size < 1:
            raise ValueError(f"per-sample state needs data_size >= 1 (the number of dataset rows), got {data_size}")
        self.names = list(init)
        self.init = dict(init)
        self.data_size = int(data_size)
        self.group = group
        self.world, self.rank = _world(group)
        self.offset, self.length = block_bounds(self.data_size, self.world, self.rank)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.tensors = {name: torch.full((self.length,), float(value), dtype=dtype, device=self.device)
                        for name, value in init.items()}

    # ---- layout -------------------------------------------------------------------------
    def bytes_per_rank(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def full_copy_bytes(self) -> int:
        """What one rank would hold with a full copy of every tensor (the reference's layout)."""
        return len(self.names) * self.data_size * torch.empty((), dtype=self.dtype).element_size()

    def shards(self) -> dict[str, tuple[tuple[int], int, torch.Tensor]]:
        """name -> ((data_size,), offset, this rank's live local tensor)."""
        return {name: ((self.data_size,), self.offset, tensor) for name, tensor in self.tensors.items()}

    # ---- exchange (collectives over the DP group) ---------------------------------------------
    def _check_indices(self, index: torch.Tensor) -> None:
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.data_size):
            bad = index[(index < 0) | (index >= self.data_size)][:5].tolist()
            raise IndexError(f"sample indices {bad} are outside [0, data_size={self.data_size}); "
                             "set the loss's data_size to the number of dataset rows (the sample key range)")

    def all_gather_index(self, local_index: torch.Tensor) -> torch.Tensor:
        """The global batch's indices in rank order, on every rank (checked against data_size).

        The check runs after the gather, so every rank raises the same error and none is left
        waiting in a later collective.
        """
        local_index = local_index.reshape(-1).to(device=self.device, dtype=torch.int64)
        if self.world > 1:
            out = torch.empty(self.world * local_index.numel(), dtype=torch.int64, device=self.device)
            all_gather_into(out, local_index.contiguous(), group=self.group)
        else:
            out = local_index
        self._check_indices(out)
        return out

    def _owned(self, global_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = global_index - self.offset
        mine = (local >= 0) & (local < self.length)
        return mine, local.clamp(0, max(self.length - 1, 0))

    def gather(self, global_index: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
        """Current values for this rank's slice of `global_index` (from `all_gather_index`)."""
        names = list(names or self.names)
        mine, local = self._owned(global_index)
        rows = [torch.where(mine, self.tensors[n][local], torch.zeros((), dtype=self.dtype, device=self.device))
                for n in names]
        stacked = torch.stack(rows) if rows else torch.empty(0, global_index.numel(), device=self.device)
        if self.world > 1:
            per_rank = global_index.numel() // self.world
            out = torch.empty(len(names), per_rank, dtype=self.dtype, device=self.device)
            # reduce_scatter works on dim 0: put the rank dim first, one contiguous block per rank.
            blocks = stacked.view(len(names), self.world, per_rank).transpose(0, 1).contiguous()
            reduce_scatter_into(out.view(-1), blocks.view(-1), group=self.group)
            stacked = out
        return {n: stacked[i] for i, n in enumerate(names)}

    def update(self, global_index: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Write the global batch's new values (each [global batch]) into the owned entries."""
        mine, local = self._owned(global_index)
        if not bool(mine.any()):
            return
        order = torch.arange(global_index.numel(), device=self.device)
        last = torch.full((self.length,), -1, dtype=torch.int64, device=self.device)
        last.scatter_reduce_(0, local[mine], order[mine], reduce="amax")
        keep = mine & (last[local] == order)
        for name, value in values.items():
            self.tensors[name][local[keep]] = value.detach().to(device=self.device, dtype=self.dtype)[keep]

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "layout": {"data_size": self.data_size, "offset": self.offset, "length": self.length,
                       "world": self.world, "names": list(self.names)},
            "tensors": {name: tensor.clone() for name, tensor in self.tensors.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Load this rank's block from a state written at the same DP size, or from full tensors.

        `state["tensors"][name]` may be this rank's block (same offset and length) or the whole
        canonical tensor [data_size] (e.g. assembled from a checkpoint written at another DP size),
        from which the block is cut.
        """
        layout = state.get("layout", {})
        if layout.get("data_size", self.data_size) != self.data_size:
            raise ValueError(f"per-sample state was saved for data_size={layout['data_size']}, "
                             f"this run has data_size={self.data_size}")
        tensors = state["tensors"]
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"per-sample state is missing {missing} (has {sorted(tensors)})")
        for name in self.names:
            value = tensors[name]
            if value.shape == (self.data_size,):
                value = value[self.offset:self.offset + self.length]
            elif layout.get("offset", self.offset) != self.offset or value.shape != (self.length,):
                raise ValueError(f"per-sample state {name!r}: block at offset {layout.get('offset')} of "
                                 f"{tuple(value.shape)} does not match this rank's block (offset {self.offset}, "
                                 f"length {self.length}); pass the full [data_size] tensor to reshard")
            self.tensors[name].copy_(value.to(self.tensors[name].dtype))


def assemble_full(states: list[dict]) -> dict[str, torch.Tensor]:
    """Full [data_size] tensors from every DP rank's `state_dict()` (tools and tests)."""
    if not states:
        raise ValueError("no per-sample states to assemble")
    data_size = states[0]["layout"]["data_size"]
    names = states[0]["layout"]["names"]
    full = {}
    for name in names:
        out = torch.empty(data_size, dtype=states[0]["tensors"][name].dtype)
        covered = 0
        for state in states:
            start, length = state["layout"]["offset"], state["layout"]["length"]
            out[start:start + length] = state["tensors"][name]
            covered += length
        if covered != data_size:
            raise ValueError(f"per-sample state {name!r}: blocks cover {covered} of {data_size} entries")
        full[name] = out
    return full
