"""Launch environment: torchrun and SLURM variables, SLURM host lists, and the SLURM batch script's
signal/requeue logic (run with stub `srun`/`scontrol`, no SLURM needed)."""
import logging
import os
import signal
import stat
import subprocess
import time

import pytest

from parallel.dims import ParallelLayoutError
from parallel.launch import (
    LaunchError, first_slurm_host, iter_slurm_hosts, parse_tasks_per_node, read_launch_env,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SBATCH = os.path.join(REPO, "examples", "slurm", "pretrain_clip.sbatch")


@pytest.mark.parametrize("nodelist,hosts", [
    ("node1", ["node1"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu-a[1-2],gpu-b3", ["gpu-a1", "gpu-a2", "gpu-b3"]),
    ("n[001-003]-ib", ["n001-ib", "n002-ib", "n003-ib"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("x[7,9],y2", ["x7", "x9", "y2"]),
    ("cn-1.cluster.org", ["cn-1.cluster.org"]),
    (" localhost ", ["localhost"]),
])
def test_slurm_host_lists(nodelist, hosts):
    assert list(iter_slurm_hosts(nodelist)) == hosts
    assert first_slurm_host(nodelist) == hosts[0]


def test_first_host_does_not_expand_everything():
    assert first_slurm_host("n[000000-999999]") == "n000000"


@pytest.mark.parametrize("nodelist", ["", "(null)", "n[1-2", "n1-2]", "n[]", "n[a-b]", "n[3-1]", "a,,b", "n[1[2]]"])
def test_bad_host_lists(nodelist):
    with pytest.raises(ValueError):
        first_slurm_host(nodelist)


@pytest.mark.parametrize("spec,counts", [("8", [8]), ("4(x2),3", [4, 4, 3]), ("2,1(x3)", [2, 1, 1, 1])])
def test_tasks_per_node(spec, counts):
    assert parse_tasks_per_node(spec) == counts


def srun_task(procid, localid, nodeid, **extra):
    """What `srun` gives task `procid` of a 16-task step over 2 nodes of a 3-node job."""
    env = {
        "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[003-004,010]", "SLURM_NODELIST": "gpu[003-004,010]",
        "SLURM_STEP_NODELIST": "gpu[004,010]", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
        "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_TASKS_PER_NODE": "8(x2)",
        "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8",
        "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid),
        "ENVIRONMENT": "BATCH",
    }
    env.update(extra)
    return env


def test_srun_task():
    env = read_launch_env(srun_task(procid=13, localid=5, nodeid=1))
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (13, 16, 5, 8)
    # the step's first node, not the job's: task 0 runs on gpu004, gpu003 has no task of this step
    assert env.master_addr == "gpu004"
    assert env.master_port == 20000 + 123456 % 10000 and 20000 <= env.master_port < 30000
    assert env.source == "slurm"


def test_every_task_agrees_on_the_master():
    envs = [read_launch_env(srun_task(procid=r, localid=r % 8, nodeid=r // 8)) for r in range(16)]
    assert {(e.master_addr, e.master_port) for e in envs} == {("gpu004", envs[0].master_port)}
    assert sorted(e.rank for e in envs) == list(range(16))


def test_master_from_environment_wins():
    env = read_launch_env(srun_task(0, 0, 0, MASTER_ADDR="10.0.0.7", MASTER_PORT="31337"))
    assert (env.master_addr, env.master_port) == ("10.0.0.7", 31337)


def test_step_count_wins_over_job_count():
    # srun -n 4 inside a 16-task job; SLURM_NTASKS kept from the job (srun --preserve-env)
    env = read_launch_env(srun_task(3, 3, 0, SLURM_STEP_NUM_TASKS="4", SLURM_STEP_TASKS_PER_NODE="4"))
    assert (env.world_size, env.local_world_size) == (4, 4)


def test_uneven_tasks_per_node():
    env = read_launch_env(srun_task(9, 1, 2, SLURM_STEP_NUM_TASKS="10", SLURM_STEP_TASKS_PER_NODE="4(x2),2",
                                    SLURM_STEP_NODELIST="gpu[003-004,010]"))
    assert (env.world_size, env.local_world_size, env.master_addr) == (10, 2, "gpu003")


def test_minimal_slurm_variables():
    env = read_launch_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "7"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (1, 2, 1, "localhost", 20007)


def test_single_slurm_task_uses_loopback_and_a_free_port():
    env = read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "gpu[1-4]",
                           "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "99"})
    assert env.world_size == 1 and env.master_addr == "127.0.0.1" and env.master_port != 20099


def test_python_in_the_batch_script_itself_fails_fast():
    # sbatch --ntasks=16 sets SLURM_PROCID=0 and SLURM_NTASKS=16 for the script; without srun this
    # process would wait forever for 15 peers
    batch = srun_task(0, 0, 0)
    for key in ("SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
                "SLURM_STEP_TASKS_PER_NODE"):
        del batch[key]
    with pytest.raises(LaunchError, match="srun python examples/pretrain_clip.py"):
        read_launch_env(batch)
    assert read_launch_env({**batch, "SLURM_NTASKS": "1", "SLURM_TASKS_PER_NODE": "1"}).world_size == 1


@pytest.mark.parametrize("change,message", [
    ({"SLURM_PROCID": "16"}, "SLURM_PROCID=16 is outside 0..15"),
    ({"SLURM_LOCALID": "8"}, "SLURM_LOCALID=8 is outside 0..7"),
    ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2"),
    ({"SLURM_STEP_NUM_TASKS": "many"}, "SLURM_STEP_NUM_TASKS='many' is not an integer"),
    ({"SLURM_STEP_NODELIST": "gpu[1-"}, "set MASTER_ADDR"),
])
def test_inconsistent_slurm_environment(change, message):
    with pytest.raises(LaunchError, match=message.replace("[", r"\[").replace("(", r"\(")):
        read_launch_env(srun_task(0, 0, 0) | change)


def test_launch_error_is_a_layout_error():  # so pretrain_clip.py reports it as `error: ...`, exit 2
    assert issubclass(LaunchError, ParallelLayoutError)


def test_gpu_count_mismatch_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="parallel.launch"):
        read_launch_env(srun_task(0, 0, 0, SLURM_STEP_TASKS_PER_NODE="2(x2)", SLURM_STEP_NUM_TASKS="4"))
    assert "8 GPUs but 2 tasks" in caplog.text


def test_torchrun_env():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                           "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr, env.master_port,
            env.source) == (3, 4, 1, 2, "h", 1234, "torchrun")


def test_torchrun_inside_slurm_wins():
    env = read_launch_env(srun_task(0, 0, 0) | {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5",
                                                 "MASTER_ADDR": "gpu004", "MASTER_PORT": "29400"})
    assert (env.source, env.rank, env.master_port) == ("torchrun", 5, 29400)


def test_torchrun_bad_rank():
    with pytest.raises(LaunchError, match="RANK=4 is outside 0..3"):
        read_launch_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_no_launcher_is_one_process():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


# --- examples/slurm/pretrain_clip.sbatch with stub srun/scontrol/torchrun ---------------------------

STUB_SRUN = """#!/bin/bash
# stands in for srun: records its arguments, then behaves like a training step that checkpoints and
# exits on USR1 (or TERM), or finishes by itself after STUB_STEP_SECONDS
echo "srun $*" >> "$STUB_LOG"
echo $$ > "$STUB_LOG.pid"
trap 'echo "step got USR1" >> "$STUB_LOG"; sleep 0.3; echo "step saved" >> "$STUB_LOG"; exit 0' USR1
trap 'echo "step got TERM" >> "$STUB_LOG"; exit 0' TERM
end=$((SECONDS + STUB_STEP_SECONDS))
while (( SECONDS < end )); do sleep 0.05; done
echo "step finished" >> "$STUB_LOG"
"""
STUB_TORCHRUN = """#!/bin/bash
echo "  --signals-to-handle SIGNALS_TO_HANDLE"
"""
STUB_SCONTROL = """#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then echo "${3%%,*}"; exit 0; fi
echo "scontrol $*" >> "$STUB_LOG"
"""


def _start_sbatch(tmp_path, step_seconds, launcher="srun", *overrides, **env_extra):
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("torchrun", STUB_TORCHRUN)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(stat.S_IRWXU)
    log = tmp_path / "stub.log"
    log.write_text("")
    env = {
        "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log), "STUB_STEP_SECONDS": str(step_seconds),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "clip", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_PER_TASK": "6", "SLURM_JOB_NODELIST": "nodeA,nodeB", "SLURM_SUBMIT_DIR": str(tmp_path),
        "LAUNCHER": launcher, **env_extra,
    }
    proc = subprocess.Popen(["bash", SBATCH, *overrides], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 20
    while "srun " not in log.read_text():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "the batch script never started its step"
        time.sleep(0.05)
    return proc, log


def _finish(proc):
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


def test_sbatch_srun_form_runs_python_per_task(tmp_path):
    proc, log = _start_sbatch(tmp_path, 0.2, "srun", "trainer.max_steps=10")
    rc, out = _finish(proc)
    lines = log.read_text().splitlines()
    assert rc == 0, out
    srun = lines[0]
    assert "--nodes=2 --ntasks-per-node=4 --cpus-per-task=6 python -u examples/pretrain_clip.py" in srun
    assert f"trainer.output_dir={tmp_path}/runs/clip-4242" in srun
    assert f"checkpoint.dir={tmp_path}/runs/clip-4242/checkpoints checkpoint.resume=auto" in srun
    assert srun.endswith("trainer.max_steps=10")  # user overrides come last, so they win
    assert "torchrun" not in srun
    assert not any(line.startswith("scontrol") for line in lines), "a finished job must not requeue"


def test_sbatch_requeued_job_resumes_from_the_same_checkpoints(tmp_path):
    """A requeued job keeps its id, so its run and checkpoint dirs are the first run's, and
    checkpoint.resume=auto picks up the checkpoint saved before the requeue."""
    commands = []
    for restart in ("0", "1"):
        proc, log = _start_sbatch(tmp_path, 0.1, "srun", SLURM_RESTART_COUNT=restart)
        rc, out = _finish(proc)
        assert rc == 0, out
        commands.append(log.read_text().splitlines()[0])
    assert commands[0] == commands[1] and "checkpoint.resume=auto" in commands[0]


def test_sbatch_python_arguments_are_valid_config(tmp_path):
    from engine.config import load_config, split_config_arg
    from engine.schema import BARE_KEYS
    from models.clip.config import CLIPExperimentConfig as ExperimentConfig

    proc, log = _start_sbatch(tmp_path, 0.1, "srun", "tensor_model_parallel_size=2")
    rc, out = _finish(proc)
    argv = log.read_text().splitlines()[0].split(" python -u examples/pretrain_clip.py ")[1].split(" ")
    config_file, overrides = split_config_arg(argv)
    cfg = load_config(ExperimentConfig, os.path.join(REPO, config_file), overrides, BARE_KEYS)
    assert cfg.checkpoint.dir == f"{tmp_path}/runs/clip-4242/checkpoints" and cfg.checkpoint.resume == "auto"
    assert cfg.trainer.output_dir == f"{tmp_path}/runs/clip-4242"
    assert cfg.parallel.tensor_model_parallel_size == 2


def test_sbatch_torchrun_form_uses_c10d(tmp_path):
    proc, log = _start_sbatch(tmp_path, 0.2, "torchrun")
    rc, out = _finish(proc)
    srun = log.read_text().splitlines()[0]
    assert rc == 0 and "warning" not in out, out
    assert "srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=24 torchrun --nnodes=2 --nproc_per_node=4" in srun
    assert "--rdzv_id=4242 --rdzv_backend=c10d --rdzv_endpoint=nodeA:24242 examples/pretrain_clip.py" in srun


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_sbatch_usr1_checkpoints_then_requeues(tmp_path, launcher):
    proc, log = _start_sbatch(tmp_path, 30, launcher)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does before the time limit
    rc, out = _finish(proc)
    lines = log.read_text().splitlines()
    # the step got the signal, finished saving, and only then was the job requeued
    assert lines[1:] == ["step got USR1", "step saved", "scontrol requeue 4242"], out
    assert "requeueing job 4242" in out


def test_sbatch_stops_requeueing_at_the_limit(tmp_path):
    proc, log = _start_sbatch(tmp_path, 30, "srun", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    proc.send_signal(signal.SIGUSR1)
    rc, out = _finish(proc)
    assert "scontrol requeue" not in log.read_text() and "not requeueing" in out


def test_sbatch_term_waits_for_the_step_without_requeue(tmp_path):
    # scancel / preemption: SLURM sends TERM to the script and to the tasks itself
    proc, log = _start_sbatch(tmp_path, 30, "srun")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert proc.poll() is None, "the script must wait for its step, not exit on TERM"
    os.kill(int((tmp_path / "stub.log.pid").read_text()), signal.SIGTERM)
    rc, out = _finish(proc)
    assert "step got TERM" in log.read_text() and "scontrol" not in log.read_text(), out
