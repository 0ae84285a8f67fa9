import pytest

from parallel.dims import ParallelDims, ParallelLayoutError
from parallel.launch import first_slurm_host, read_launch_env


def test_dp_is_derived():
    dims = ParallelDims(tp=2, pp=2, world_size=8)
    assert dims.dp == 2


@pytest.mark.parametrize("tp,pp,world", [(4, 1, 1), (2, 2, 6), (3, 1, 4)])
def test_non_dividing_layout(tp, pp, world):
    with pytest.raises(ParallelLayoutError, match=f"world size {world} is not divisible"):
        ParallelDims(tp=tp, pp=pp, world_size=world)


def test_non_positive_degree():
    with pytest.raises(ParallelLayoutError, match="tensor_model_parallel_size must be a positive integer"):
        ParallelDims(tp=0, pp=1, world_size=1)


def test_torchrun_env():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (3, 4, 1, "h", "torchrun")


def test_slurm_env():
    env = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "gpu[003-004,010]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "gpu003")
    assert env.master_port == 20000 + 4242 and env.source == "slurm"


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("a[01-02]", "a01"), ("x[7,9],y2", "x7")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first
