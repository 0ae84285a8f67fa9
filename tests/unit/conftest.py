"""One-process parallel state for unit tests that build megatron-core modules (TP=PP=DP=1, gloo)."""
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")


@pytest.fixture(scope="session")
def single_rank():
    from parallel.context import destroy_parallel, initialize_parallel

    ctx = initialize_parallel(1, 1, device="cpu", seed=0, environ={})
    yield ctx
    destroy_parallel()
