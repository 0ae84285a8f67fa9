"""The few places where megatron-core 0.16 hard-codes CUDA, made to work on CPU.

Applied once, explicitly, by `apply_cpu_shims()` at initialisation when the device is CPU; never on
GPU. Each shim names the megatron-core function it replaces. `tests/unit/test_cpu_shims.py` checks
that those functions still exist with the shape assumed here, so a megatron-core upgrade that moves
them fails loudly instead of silently running CUDA code paths.
"""
from __future__ import annotations

import contextlib

import torch
from megatron.core import utils as mcore_utils
from megatron.core.tensor_parallel import layers as mcore_layers
from megatron.core.tensor_parallel import mappings as mcore_mappings
from megatron.core.tensor_parallel import random as mcore_random

from parallel import host_allreduce

_applied = False


def _get_cpu_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Replaces megatron.core.tensor_parallel.random._get_cuda_rng_state (CUDA generator only)."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    """Replaces megatron.core.tensor_parallel.random._set_cuda_rng_state."""
    torch.set_rng_state(new_state)


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron-core's RNG tracker with the CPU generator standing in for the CUDA one.

    Replaces `CudaRNGStatesTracker.add` (torch.cuda.manual_seed) and `.fork` (whose "CPU RNG state
    changed" check is meaningless when the tracked generator *is* the CPU one). Names, seeds and the
    get_states/set_states interface are megatron-core's, so recompute and checkpoints work unchanged.
    """

    def __init__(self):
        super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=False)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig_state = torch.get_rng_state()
        orig_name = self._current_state_name
        if orig_name != "default-rng":
            self.states_[orig_name] = orig_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if orig_name != "default-rng":
                orig_state = self.states_[orig_name]
            torch.set_rng_state(orig_state)
            self._current_state_name = orig_name


class _CudaOnCpu:
    """`torch.cuda` as seen by a shimmed module: `current_device()` names the CPU."""

    @staticmethod
    def current_device():
        return torch.device("cpu")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _DistributedOnCpu:
    """`torch.distributed` as seen by a shimmed module: `all_reduce` goes through shared memory where
    the group has a host reducer (megatron's TP all-reduces between ranks of one host,
    parallel/host_allreduce.py), everything else is torch's."""

    all_reduce = staticmethod(host_allreduce.all_reduce)

    def __getattr__(self, name):
        return getattr(torch.distributed, name)


class _TorchOnCpu:
    """`torch` as seen by a shimmed megatron module: everything is torch's except `torch.cuda` and
    `torch.distributed.all_reduce`."""

    cuda = _CudaOnCpu()
    distributed = _DistributedOnCpu()

    def __getattr__(self, name):
        return getattr(torch, name)


# Modules that place sequence-parallel buffers with `torch.cuda.current_device()`: the all-gather
# buffer (`utils.GlobalMemoryBuffer.get_tensor`), the input all-gather in the backward of
# `tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication`, and the gather /
# reduce-scatter outputs in `tensor_parallel.mappings`. The same two modules issue the TP
# all-reduces (`mappings._reduce`, the layers' input-gradient all-reduce), which `torch.distributed`
# as they see it routes through shared memory where it can. Only their own view of `torch` changes;
# torch itself, and any code that really uses a GPU, are untouched.
CUDA_PLACING_MODULES = (mcore_utils, mcore_layers, mcore_mappings)


def apply_cpu_shims() -> None:
    """Install the CPU RNG tracker and CPU RNG-state helpers in megatron-core, and let the modules
    that place sequence-parallel buffers on `torch.cuda.current_device()` place them on the CPU
    (idempotent)."""
    global _applied
    if _applied:
        return
    for module in CUDA_PLACING_MODULES:
        module.torch = _TorchOnCpu()
    mcore_random._get_cuda_rng_state = _get_cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _applied = True


def cpu_shims_applied() -> bool:
    return _applied
