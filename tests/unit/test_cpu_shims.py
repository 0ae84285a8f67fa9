"""The CPU shims replace specific megatron-core functions; fail loudly if those move or change."""
import inspect

import torch
from megatron.core.tensor_parallel import random as mcore_random

from parallel.cpu_shims import CpuRNGStatesTracker


def test_replaced_megatron_functions_still_exist():
    # Functions and globals parallel/cpu_shims.py replaces, with the parameters it assumes.
    assert list(inspect.signature(mcore_random._get_cuda_rng_state).parameters)[:3] == ["device", "clone", "graph_safe"]
    assert list(inspect.signature(mcore_random._set_cuda_rng_state).parameters)[:3] == ["new_state", "device", "graph_safe"]
    assert hasattr(mcore_random, "_CUDA_RNG_STATE_TRACKER") and hasattr(mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED")
    assert set(inspect.signature(mcore_random.CudaRNGStatesTracker.fork).parameters) == {"self", "name"}
    assert {"get_states", "set_states", "add", "reset"} <= set(dir(mcore_random.CudaRNGStatesTracker))


def test_installed_tracker_is_cpu(single_rank):
    assert isinstance(mcore_random.get_cuda_rng_tracker(), CpuRNGStatesTracker)


def test_tracker_fork_is_a_separate_stream():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    with tracker.fork("model-parallel-rng"):
        a = torch.rand(3)
    after_fork = torch.rand(3)
    torch.manual_seed(0)
    plain = torch.rand(3)
    assert torch.equal(after_fork, plain)  # the default stream did not advance inside the fork
    torch.manual_seed(123)
    assert torch.equal(a, torch.rand(3))  # the fork drew from the tracked seed
    with tracker.fork("model-parallel-rng"):
        b = torch.rand(3)
    assert not torch.equal(a, b)  # and the tracked stream advances across forks


def test_tracker_states_round_trip():
    tracker = CpuRNGStatesTracker()
    tracker.add("s", 7)
    saved = {k: v.clone() for k, v in tracker.get_states().items()}
    with tracker.fork("s"):
        x = torch.rand(2)
    tracker.set_states(saved)
    with tracker.fork("s"):
        y = torch.rand(2)
    assert torch.equal(x, y)


def test_cuda_placing_modules_still_place_on_current_device():
    """The shimmed modules still call `torch.cuda.current_device()` where SP buffers are made; if
    megatron-core stops doing so, the shim (and this test) can go."""
    from megatron.core import utils as mcore_utils
    from megatron.core.tensor_parallel import layers as mcore_layers

    assert "torch.cuda.current_device()" in inspect.getsource(mcore_utils.GlobalMemoryBuffer.get_tensor)
    backward = inspect.getsource(mcore_layers.LinearWithGradAccumulationAndAsyncCommunication.backward)
    assert "torch.cuda.current_device()" in backward
    from megatron.core.tensor_parallel import mappings as mcore_mappings

    assert "torch.cuda.current_device()" in inspect.getsource(mcore_mappings._reduce_scatter_along_first_dim)


def test_shimmed_modules_place_buffers_on_cpu(single_rank):
    from megatron.core import utils as mcore_utils

    buffer = mcore_utils.GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "test")
    assert buffer.device.type == "cpu" and buffer.shape == (2, 3)
    assert mcore_utils.torch.Tensor is torch.Tensor  # everything but torch.cuda is torch's own
