"""Strided tensor-parallel partitions (megatron's gated-MLP fc1: TP rank r holds [gate_r; up_r] of
the canonical [gate; up]) are `stride` boxes of the canonical tensor, for whole tensors and for
ZeRO-1 flat ranges of them alike: every element of every rank lands exactly once, where the TP=1
model holds it."""
import torch

from engine.checkpoint.layout import TensorSpec, flat_range_boxes


def _full_and_shards(rows=12, cols=5, tp=2, stride=2):
    full = torch.arange(rows * cols, dtype=torch.float32).view(rows, cols)
    gate, up = full.chunk(stride)
    shards = [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]  # megatron's layout
    return full, shards


def _spec(tp_rank, tp, shape, stride=2):
    return TensorSpec("fc1", (shape[0] * tp, shape[1]), (tp_rank * shape[0] // stride, 0), 0, False, stride,
                      tp_rank, tp)


def test_whole_tensor_boxes_rebuild_the_canonical_tensor():
    full, shards = _full_and_shards()
    rebuilt = torch.full_like(full, float("nan"))
    for rank, local in enumerate(shards):
        for off, view in _spec(rank, 2, tuple(local.shape)).boxes(local):
            rebuilt[off[0]:off[0] + view.shape[0], off[1]:off[1] + view.shape[1]] = view
    assert torch.equal(rebuilt, full)


def test_flat_ranges_land_where_the_canonical_tensor_holds_them():
    full, shards = _full_and_shards(rows=12, cols=5)
    for rank, local in enumerate(shards):
        spec, flat = _spec(rank, 2, tuple(local.shape)), local.reshape(-1)
        for lo, hi in ((0, 30), (3, 21), (7, 8), (12, 18), (14, 16)):  # partial rows, across the gate/up seam (15)
            covered = 0
            for off, sizes, start in spec.flat_boxes(tuple(local.shape), lo, hi):
                piece = flat[lo + start: lo + start + sizes[0] * sizes[1]].view(sizes)
                assert torch.equal(piece, full[off[0]:off[0] + sizes[0], off[1]:off[1] + sizes[1]]), (rank, lo, hi)
                covered += piece.numel()
            assert covered == hi - lo


def test_unstrided_flat_boxes_are_the_shifted_local_boxes():
    spec = TensorSpec("w", (8, 3), (4, 0), 0, False)
    assert spec.flat_boxes((4, 3), 2, 9) == [((4 + o[0], o[1]), s, st) for o, s, st in flat_range_boxes((4, 3), 2, 9)]
