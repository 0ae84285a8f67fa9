"""Seeding: Python, NumPy, torch, and megatron-core's model-parallel RNG tracker.

The default generator gets the same seed on every TP rank of a replica (so replicated dropout
matches); the tracker's model-parallel stream gets seed + 2718 + tp_rank (so dropout on split
activations differs per TP rank), exactly megatron-core's scheme.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mcore_random


def seed_everything(seed: int) -> None:
    """Seed all generators. Call after `parallel_state` is initialised (the tracker needs TP rank)."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    # Pipeline stages hold different layers: give them different default streams (as Megatron-LM).
    stage_seed = seed + 100 * pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed % (2**32))
    torch.manual_seed(stage_seed)
    # With the CPU shims applied the tracker seeds the CPU generator; on GPU, the CUDA one.
    mcore_random.model_parallel_cuda_manual_seed(stage_seed)


def get_rng_state() -> dict:
    """Everything needed to resume the random streams exactly (for checkpoints)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": mcore_random.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    mcore_random.get_cuda_rng_tracker().set_states(state["tracker"])
