"""Initialise torch.distributed and megatron-core's parallel state from one validated layout."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from parallel import host_allreduce
from parallel.cpu_shims import apply_cpu_shims
from parallel.dims import ParallelDims
from parallel.launch import LaunchEnv, read_launch_env
from parallel.random import seed_everything
from parallel.timeouts import apply_to_every_group, configure

log = logging.getLogger(__name__)


@dataclass
class ParallelContext:
    """Where this rank sits: its degrees, ranks within each group, groups and device."""

    dims: ParallelDims
    launch: LaunchEnv
    device: torch.device
    backend: str
    timeout_minutes: float = 10.0  # every process group's (parallel.distributed_timeout_minutes)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def tp_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    @property
    def dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    @property
    def tp_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    @property
    def pp_group(self):
        return parallel_state.get_pipeline_model_parallel_group()

    @property
    def dp_group(self):
        return parallel_state.get_data_parallel_group()

    @property
    def model_parallel_group(self):
        return parallel_state.get_model_parallel_group()

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def select_device(requested: str, local_rank: int) -> torch.device:
    """`auto` takes the GPU when one is visible, else the CPU; `cpu`/`cuda` force it."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device={requested!r}: use auto, cpu or cuda")


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    device: str = "auto",
    seed: int = 1234,
    timeout_minutes: float = 10.0,
    environ: dict | None = None,
    host_shared_memory: bool = True,
) -> ParallelContext:
    """Validate the layout, then create process groups and seed every RNG.

    The layout check runs before `init_process_group`, so a bad layout fails at once on every rank
    instead of hanging in a collective. Every group (the world, megatron-core's, and the engine's
    through `parallel.timeouts.new_group`) waits at most `timeout_minutes` for a missing rank.
    `host_shared_memory` (CPU only): ranks of one host reduce through /dev/shm where they can
    (`parallel/host_allreduce.py`): the DP gradient average and megatron's TP all-reduces.
    """
    launch = read_launch_env(environ)
    # Megatron's TP layers overlap their gradient all-reduce with compute only when the GPU runs one
    # hardware queue (Megatron-LM's launch scripts set this too); harmless on CPU.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    dims = ParallelDims(tensor_model_parallel_size, pipeline_model_parallel_size, launch.world_size)
    dev = select_device(device, launch.local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        apply_cpu_shims()
    timeout = configure(timeout_minutes)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=dims.tp,
            pipeline_model_parallel_size=dims.pp,
            distributed_timeout_minutes=timeout_minutes,  # megatron's default is 30
        )
    # megatron-core 0.16 makes a few groups without its timeout (e.g. the expert-DP gloo group)
    changed = apply_to_every_group(timeout)
    if changed and launch.rank == 0:
        log.debug("process group timeouts set to %s: %s", timeout, ", ".join(changed))
    host_allreduce.configure(host_shared_memory and dev.type == "cpu")
    if dims.tp > 1:  # collective over each TP group; a no-op on GPU or when switched off
        host_allreduce.register_reducer(parallel_state.get_tensor_model_parallel_group())
    seed_everything(seed)
    ctx = ParallelContext(dims=dims, launch=launch, device=dev, backend=backend, timeout_minutes=timeout_minutes)
    if launch.rank == 0:
        log.info("parallel layout %s, backend %s, device %s, launched by %s", dims, backend, dev, launch.source)
    return ctx


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    host_allreduce.configure(True)  # drops the reducers of the groups destroyed here
    if dist.is_initialized():
        dist.destroy_process_group()
