"""Layout-independent names and boxes: where this rank's tensors sit inside the canonical tensors.

A canonical tensor is what a TP=1/PP=1 model holds under the same name, with transformer layers
numbered globally. Every piece a rank saves or loads is an N-d box of a canonical tensor:

- a tensor-parallel parameter (megatron's `tensor_model_parallel`/`partition_dim` attributes) is the
  box [tp_rank * local, (tp_rank + 1) * local) along its partition dim, the whole extent elsewhere;
- a replicated parameter is the whole tensor (every rank offers it; the writer keeps one copy);
- a ZeRO-1 shard of a parameter is a contiguous range of its flattened local tensor, which is a
  few boxes (a partial row, a block of whole rows, a partial row; recursively per dimension).

Pipeline stages hold a subset of the layers under local indices; megatron's `TransformerLayer`
carries its global 1-based `layer_number`, so the canonical name is found from the model itself
(`parallel.pp_sharding.layer_offsets` / `global_name`), and `local_to_global_name` gives the same answer from arithmetic for
tools that have no model at hand.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from parallel.pp_sharding import global_name, layer_offsets

# Towers whose transformer blocks are split over pipeline stages, as they appear in parameter names.
LAYER_RE = re.compile(r"^(?P<prefix>.*?\btransformer\.layers\.)(?P<index>\d+)(?P<rest>\..*)$")


def local_to_global_name(name: str, pp_rank: int, pp_size: int, num_layers: dict[str, int]) -> str:
    """`visual.transformer.layers.{i}.x` on stage `pp_rank` -> `visual.transformer.layers.{i + offset}.x`,
    offset = pp_rank * num_layers[tower] // pp_size (even splits; `num_layers` maps the prefix before
    `.transformer.layers.`, e.g. {"visual": 12, "text": 12}, to the tower's total layer count)."""
    match = LAYER_RE.match(name)
    if match is None or pp_size == 1:
        return name
    tower = match.group("prefix")[: -len("transformer.layers.")].rstrip(".")
    total = num_layers[tower]
    if total % pp_size:
        raise ValueError(f"{tower}: {total} layers do not split evenly over {pp_size} pipeline stages")
    index = int(match.group("index")) + pp_rank * (total // pp_size)
    return f"{match.group('prefix')}{index}{match.group('rest')}"


@dataclass(frozen=True)
class TensorSpec:
    """Where one rank's local tensor sits in its canonical tensor.

    A strided partition (megatron's gated-MLP `linear_fc1`: TP rank r holds [gate_r; up_r] of the
    canonical [gate; up]) is `stride` boxes of the canonical tensor, one per slice of the local
    tensor along the partition dim; `boxes` and `flat_boxes` give them."""

    name: str  # canonical name
    global_shape: tuple
    offsets: tuple  # of the local tensor inside the canonical one (its first box when strided)
    partition_dim: int | None  # tensor-parallel split dim, None when replicated
    padded: bool  # rows past the true vocabulary are padding (size differs between TP sizes)
    stride: int = 1  # megatron's partition_stride
    tp_rank: int = 0
    tp_size: int = 1

    def describe(self) -> dict:
        out = {"shape": list(self.global_shape), "partition_dim": self.partition_dim, "padded": self.padded}
        if self.stride != 1:
            out["partition_stride"] = self.stride
        return out

    def _pieces(self, local_shape: tuple) -> list[tuple[tuple, int, int]]:
        """[(global offsets, first local index, size)] along the partition dim."""
        if self.stride == 1:
            dim = self.partition_dim or 0
            return [(self.offsets, 0, local_shape[dim] if local_shape else 0)]
        from parallel.tp_sharding import partition_boxes

        return [(off, sl.start, sl.stop - sl.start) for off, _, sl in
                partition_boxes(local_shape, self.partition_dim, self.stride, self.tp_rank, self.tp_size)]

    def boxes(self, local: torch.Tensor) -> list[tuple[tuple, torch.Tensor]]:
        """[(global offsets, view of `local`)] covering the local tensor."""
        if self.stride == 1:
            return [(self.offsets, local)]
        return [(off, local.narrow(self.partition_dim, start, size))
                for off, start, size in self._pieces(tuple(local.shape))]

    def flat_boxes(self, local_shape: tuple, lo: int, hi: int) -> list[tuple[tuple, tuple, int]]:
        """Elements [lo, hi) of the flattened local tensor as (global offsets, sizes, start) boxes,
        `start` counted from `lo` (a ZeRO-1 shard of a parameter; see `flat_range_boxes`)."""
        local_boxes = flat_range_boxes(local_shape, lo, hi)
        if self.stride == 1:
            return [(shift(off, self.offsets), sizes, start) for off, sizes, start in local_boxes]
        if self.partition_dim != 0:
            raise NotImplementedError(f"{self.name}: strided partitions along dim {self.partition_dim}")
        out = []
        for off, sizes, start in local_boxes:  # split row blocks where the local slices meet
            first, rows = off[0], sizes[0]
            for global_off, piece_start, piece_size in self._pieces(local_shape):
                a, b = max(first, piece_start), min(first + rows, piece_start + piece_size)
                if a >= b:
                    continue
                goff = (global_off[0] + a - piece_start, *off[1:])
                out.append((goff, (b - a, *sizes[1:]), start + (a - first) * math.prod(sizes[1:])))
        return out


# A parameter attribute a model sets on other tensors whose rows are the padded vocabulary (an LLM's
# untied output layer, a ColumnParallelLinear over the vocabulary): their padding differs between TP
# sizes as the embedding's does.
VOCAB_PADDED_ATTR = "vocab_padded"


def _vocab_padded_params(model: torch.nn.Module) -> set:
    from megatron.core.tensor_parallel.layers import VocabParallelEmbedding

    ids = {id(p) for m in model.modules() if isinstance(m, VocabParallelEmbedding) for p in m.parameters(recurse=False)}
    return ids | {id(p) for p in model.parameters() if getattr(p, VOCAB_PADDED_ATTR, False)}


def param_specs(model: torch.nn.Module, tp_rank: int, tp_size: int) -> dict[str, TensorSpec]:
    """Local parameter name -> its `TensorSpec` (parameters only; buffers are listed by `tensor_specs`)."""
    offsets = layer_offsets(model)
    padded = _vocab_padded_params(model)
    specs = {}
    for name, param in model.named_parameters():
        specs[name] = _spec(global_name(name, offsets), param, tp_rank, tp_size, id(param) in padded)
    return specs


def tensor_specs(model: torch.nn.Module, tp_rank: int, tp_size: int) -> dict[str, TensorSpec]:
    """Every tensor of `model.state_dict()` (parameters and persistent buffers) -> `TensorSpec`."""
    specs = param_specs(model, tp_rank, tp_size)
    offsets = layer_offsets(model)
    for name, value in model.state_dict(keep_vars=True).items():
        if name not in specs and torch.is_tensor(value):
            specs[name] = _spec(global_name(name, offsets), value, tp_rank, tp_size, False)
    return specs


def _spec(name: str, tensor: torch.Tensor, tp_rank: int, tp_size: int, padded: bool) -> TensorSpec:
    shape = tuple(tensor.shape)
    if getattr(tensor, "tensor_model_parallel", False) and tp_size > 1:
        stride = getattr(tensor, "partition_stride", 1)
        dim = tensor.partition_dim
        global_shape = tuple(s * tp_size if d == dim else s for d, s in enumerate(shape))
        offsets = tuple(tp_rank * s if d == dim else 0 for d, s in enumerate(shape))
        if stride != 1:
            if shape[dim] % stride:
                raise ValueError(f"{name}: local size {shape[dim]} along dim {dim} is not divisible by its "
                                 f"partition stride {stride}")
            offsets = tuple(tp_rank * (s // stride) if d == dim else 0 for d, s in enumerate(shape))
        return TensorSpec(name, global_shape, offsets, dim, padded, stride, tp_rank, tp_size)
    dim = tensor.partition_dim if getattr(tensor, "tensor_model_parallel", False) else None
    stride = getattr(tensor, "partition_stride", 1) if dim is not None else 1
    return TensorSpec(name, shape, (0,) * len(shape), dim, padded, stride)


def flat_range_boxes(shape: tuple, lo: int, hi: int) -> list[tuple[tuple, tuple, int]]:
    """Elements [lo, hi) of a row-major tensor of `shape` as boxes: (offsets, sizes, start) where
    `start` is the box's first element counted from `lo` (boxes come in order and are contiguous)."""
    if lo >= hi:
        return []
    if len(shape) == 0:
        return [((), (), 0)]
    if len(shape) == 1:
        return [((lo,), (hi - lo,), 0)]
    inner = math.prod(shape[1:])
    boxes = []
    first, last = lo // inner, (hi - 1) // inner
    if first == last:
        for off, size, start in flat_range_boxes(shape[1:], lo - first * inner, hi - first * inner):
            boxes.append(((first, *off), (1, *size), start))
        return boxes
    position = lo
    if lo % inner:  # partial first row
        for off, size, start in flat_range_boxes(shape[1:], lo % inner, inner):
            boxes.append(((first, *off), (1, *size), start))
        first += 1
        position = first * inner
    full_end = last + 1 if hi % inner == 0 else last
    if full_end > first:  # whole rows
        boxes.append(((first, *(0,) * (len(shape) - 1)), (full_end - first, *shape[1:]), position - lo))
        position = full_end * inner
    if hi % inner:  # partial last row
        for off, size, start in flat_range_boxes(shape[1:], 0, hi % inner):
            boxes.append(((last, *off), (1, *size), position - lo + start))
    return boxes


def shift(offsets: tuple, by: tuple) -> tuple:
    return tuple(a + b for a, b in zip(offsets, by))


def clip_box(offsets: tuple, tensor: torch.Tensor, bound: tuple):
    """The part of a box (at `offsets`, data `tensor`) inside [0, bound): (offsets, narrowed tensor),
    or None when nothing is inside."""
    for dim, (off, size, limit) in enumerate(zip(offsets, tensor.shape, bound)):
        keep = min(off + size, limit) - off
        if keep <= 0:
            return None
        if keep < size:
            tensor = tensor.narrow(dim, 0, keep)
    return offsets, tensor
