"""Parallel degrees, validated against the world size before any process group exists."""
from __future__ import annotations

from dataclasses import dataclass


class ParallelLayoutError(ValueError):
    """A parallel layout that cannot be placed on the processes launched."""


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of tensor (tp), pipeline (pp) and data (dp) parallelism; dp is derived."""

    tp: int
    pp: int
    world_size: int

    def __post_init__(self):
        for name, value in (("tensor_model_parallel_size", self.tp), ("pipeline_model_parallel_size", self.pp)):
            if not isinstance(value, int) or value < 1:
                raise ParallelLayoutError(f"{name} must be a positive integer, got {value!r}")
        model_parallel = self.tp * self.pp
        if self.world_size % model_parallel:
            raise ParallelLayoutError(
                f"world size {self.world_size} is not divisible by tensor_model_parallel_size={self.tp} x "
                f"pipeline_model_parallel_size={self.pp} = {model_parallel}. Launch a multiple of "
                f"{model_parallel} processes (torchrun --nproc_per_node={model_parallel}), or lower the "
                "parallel sizes."
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def check_divides(self, what: str, size: int, degree_name: str, degree: int) -> None:
        """Model dimensions split by a degree (heads by TP, layers by PP) must divide evenly."""
        if size % degree:
            raise ParallelLayoutError(f"{what}={size} is not divisible by {degree_name}={degree}")

    def __str__(self) -> str:
        return f"TP={self.tp} PP={self.pp} DP={self.dp} (world size {self.world_size})"
