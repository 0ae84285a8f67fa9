"""Multi-process launch the way a cluster does it, without the test harness's spawn:

- SLURM without torchrun: two plain `python` processes that see only what `srun` would set
  (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_JOB_NODELIST/SLURM_JOB_ID/SLURM_STEP_ID; no RANK,
  WORLD_SIZE or MASTER_*) initialise through `initialize_parallel`, then train through
  examples/pretrain_clip.py;
- two torchrun "nodes" on localhost joined by c10d rendezvous, training with TP=2 across them;
- a bad layout, and a `python` started in the batch script without srun, stop at once with a clear
  error on every process, long before the 10-minute distributed timeout.

Every run is a tiny CLIP for 2 steps on a 64-image synthetic set; nearly all the time is process
start-up (importing torch and megatron-core).
"""
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from data.synthetic import generate_shapes_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_TIMEOUT = 240  # seconds per group of processes; a hang fails the test instead of the suite

TINY = [
    "--config", "configs/clip/tiny.yaml", "device=cpu",
    "data.synthetic.num_train=64", "data.synthetic.num_eval=24", "data.synthetic.image_size=16",
    "data.synthetic.samples_per_shard=32", "data.tokenizer.vocab_size=100", "data.shuffle_buffer=0",
    "model.output_dim=16", "model.vision.img_h=16", "model.vision.img_w=16", "model.vision.patch_dim=8",
    "model.vision.num_layers=1", "model.text.num_layers=1", "model.text.encoder_seq_length=16",
    "model.vision.hidden_size=32", "model.text.hidden_size=32",
    "model.vision.ffn_hidden_size=64", "model.text.ffn_hidden_size=64",
    "model.vision.num_attention_heads=2", "model.text.num_attention_heads=2",
    "trainer.max_steps=2", "trainer.micro_batch_size=8", "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=0", "optim.sched.warmup_steps=1", "eval.zero_shot=false", "eval.retrieval=false",
]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    generate_shapes_dataset(out, num_train=64, num_eval=24, image_size=16, samples_per_shard=32)
    return out


def free_port(lo: int = 0, hi: int = 0) -> int:
    """A free TCP port, in [lo, hi) when given."""
    for port in (random.sample(range(lo, hi), min(500, hi - lo)) if lo else [0]):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError(f"no free port in [{lo}, {hi})")


def base_env(**extra) -> dict:
    """This machine's environment without any launcher's variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONUNBUFFERED="1", **extra)
    return env


def slurm_task_env(procid: int, ntasks: int, job_id: int) -> dict:
    """What `srun --ntasks=<ntasks>` on one node gives each task (the engine derives the port from the job id)."""
    return base_env(SLURM_PROCID=str(procid), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(procid),
                    SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(job_id),
                    SLURM_STEP_ID="0", SLURM_TASKS_PER_NODE=str(ntasks))


def slurm_job_id() -> int:
    """A job id whose derived rendezvous port (20000 + id % 10000) is free on this machine."""
    return 7_000_000 + free_port(20000, 30000) - 20000


def run_all(cmds_envs, log_dir, timeout=RUN_TIMEOUT):
    """Start every (cmd, env) at once; return [(returncode, output)] and the seconds they took."""
    os.makedirs(log_dir, exist_ok=True)
    procs, logs, start = [], [], time.time()
    for i, (cmd, env) in enumerate(cmds_envs):
        logs.append(open(os.path.join(log_dir, f"proc{i}.log"), "w+"))
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=logs[-1], stderr=subprocess.STDOUT,
                                      start_new_session=True))  # own group: killed as a whole below
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, start + timeout - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):  # TERM: torchrun stops its workers
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, sig)
            for proc in procs:
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
    results = []
    for proc, log in zip(procs, logs):
        log.seek(0)
        results.append((proc.returncode, log.read()))
        log.close()
    return results, time.time() - start


def describe(results) -> str:
    return "\n".join(f"--- process {i}: exit {rc}\n{out[-4000:]}" for i, (rc, out) in enumerate(results))


def logged_losses(output: str) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+/\d+ \| loss (\S+)", output)]


def test_srun_without_torchrun(tmp_path, shapes):
    """Two tasks with only srun's variables: `initialize_parallel` places them (ranks, world, TP/DP,
    collectives on the world and the DP group), then examples/pretrain_clip.py, run as a script in
    the same processes, trains 2 steps at DP=2 on these groups: finite loss, metrics written."""
    out_dir = tmp_path / "run"
    worker = (
        "import os, runpy, sys, torch, torch.distributed as dist\n"
        "from parallel.context import initialize_parallel\n"
        "ctx = initialize_parallel(tensor_model_parallel_size=1, device='cpu')\n"
        "r = int(os.environ['SLURM_PROCID'])\n"
        "assert ctx.launch.source == 'slurm', ctx.launch\n"
        "assert (ctx.rank, dist.get_world_size(), ctx.launch.local_rank, ctx.launch.master_addr) == (r, 2, r, 'localhost')\n"
        "assert ctx.launch.master_port == 20000 + int(os.environ['SLURM_JOB_ID']) % 10000\n"
        "assert (ctx.dims.tp, ctx.dims.pp, ctx.dims.dp, ctx.tp_rank, ctx.dp_rank) == (1, 1, 2, 0, r)\n"
        "t = torch.tensor([r + 1.0]); dist.all_reduce(t); assert t.item() == 3.0, t\n"
        "t = torch.tensor([10.0 ** r]); dist.all_reduce(t, group=ctx.dp_group); assert t.item() == 11.0, t\n"
        "print('rank', r, 'initialised', flush=True)\n"
        "sys.argv = ['examples/pretrain_clip.py'] + sys.argv[1:]\n"
        "runpy.run_path('examples/pretrain_clip.py', run_name='__main__')  # its main() reuses these groups\n"
    )
    args = [sys.executable, "-c", worker, *TINY, f"data.synthetic.out_dir={shapes}",
            f"trainer.output_dir={out_dir}", "trainer.global_batch_size=16"]
    job = slurm_job_id()
    results, _ = run_all([(args, slurm_task_env(r, 2, job)) for r in range(2)], tmp_path / "logs")
    assert [rc for rc, _ in results] == [0, 0], describe(results)
    assert all(f"rank {r} initialised" in out for r, (_, out) in enumerate(results)), describe(results)
    rank0 = results[0][1]
    assert "TP=1 PP=1 DP=2 (world size 2)" in rank0 and "launched by slurm" in rank0, rank0
    losses = logged_losses(rank0)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), rank0
    assert json.loads((out_dir / "final_metrics.json").read_text())["step"] == 2


def torchrun_node(port: int, *args, nnodes: int = 2):
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc_per_node=1",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}", "--rdzv_id=test_launch",
            "examples/pretrain_clip.py", *TINY, *args]


def test_two_torchrun_nodes_with_c10d_rendezvous(tmp_path, shapes):
    """Two torchrun agents (one process each) meet through c10d on localhost; TP=2 spans both."""
    out_dir = tmp_path / "run"
    port = free_port()
    cmd = torchrun_node(port, "tensor_model_parallel_size=2", "trainer.global_batch_size=8",
                        f"data.synthetic.out_dir={shapes}", f"trainer.output_dir={out_dir}")
    # --node_rank is what a static rendezvous would need; c10d assigns ranks itself and ignores it
    results, _ = run_all([(cmd[:5] + [f"--node_rank={n}"] + cmd[5:], base_env()) for n in range(2)], tmp_path / "logs")
    assert [rc for rc, _ in results] == [0, 0], describe(results)
    both = results[0][1] + results[1][1]
    assert "TP=2 PP=1 DP=1 (world size 2)" in both and "launched by torchrun" in both, describe(results)
    losses = logged_losses(both)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), describe(results)
    assert json.loads((out_dir / "final_metrics.json").read_text())["step"] == 2


def test_bad_layouts_fail_fast(tmp_path, shapes):
    """Every process stops with a clear error and a non-zero exit before any collective: the
    distributed timeout is 10 minutes, the check takes process start-up time. Two SLURM tasks with
    TP=4; and `python` run in the batch script itself (no srun) of a 2-task job, which would
    otherwise wait forever for a second process that nobody starts."""
    common = [*TINY, f"data.synthetic.out_dir={shapes}", f"trainer.output_dir={tmp_path / 'run'}"]
    job = slurm_job_id()
    tp4 = [sys.executable, "examples/pretrain_clip.py", *common, "tensor_model_parallel_size=4"]
    batch = {k: v for k, v in slurm_task_env(0, 2, job).items() if k != "SLURM_STEP_ID"}
    batch["ENVIRONMENT"] = "BATCH"
    results, took = run_all([(tp4, slurm_task_env(r, 2, job)) for r in range(2)]
                            + [([sys.executable, "examples/pretrain_clip.py", *common], batch)], tmp_path / "logs")
    assert [rc for rc, _ in results] == [2, 2, 2], describe(results)
    # Every problem of the layout at once (the tiny config's 2 heads do not divide TP=4 either).
    assert all("error: the parallel layout cannot run" in out and
               "world size 2 is not divisible by tensor_model_parallel_size=4" in out and
               "model.vision.num_attention_heads=2 is not divisible by tensor_model_parallel_size=4" in out
               for _, out in results[:2]), describe(results)
    assert "error: this process runs in the SLURM batch script itself" in results[2][1], describe(results)
    assert took < RUN_TIMEOUT - 30


FAKE_SRUN = '''#!{python}
"""Stand-in for srun on one machine: starts the step's tasks of the command with the variables srun
gives each task, relays USR1 to them as srun does, and exits with the highest task status."""
import os, signal, subprocess, sys
args, opts = sys.argv[1:], {{}}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
assert opts.get("nodes", "1") == "1", "this stand-in runs one node"
n = int(opts.get("ntasks-per-node", "1"))
with open(os.environ["STUB_LOG"], "a") as fh:
    fh.write("srun " + " ".join(sys.argv[1:]) + "\\n")
procs = []
for i in range(n):
    env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID="0", SLURM_NTASKS=str(n),
               SLURM_STEP_NUM_TASKS=str(n), SLURM_STEP_ID="0", SLURM_STEP_NODELIST="localhost",
               SLURM_STEP_TASKS_PER_NODE=str(n), SLURM_JOB_NODELIST="localhost")
    log = open(os.path.join(os.environ["STUB_TASK_LOGS"], f"task{{i}}.log"), "w")
    procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
signal.signal(signal.SIGUSR1, lambda sig, frame: [p.send_signal(sig) for p in procs if p.poll() is None])
sys.exit(max(p.wait() for p in procs))
'''
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
"""


def test_sbatch_time_limit_checkpoints_and_requeues(tmp_path, shapes):
    """examples/slurm/pretrain_clip.sbatch end to end, with stand-ins for srun and scontrol: two real
    training tasks; USR1 to the batch shell (what `--signal=B:USR1@...` does) reaches them through
    srun, they save a checkpoint under checkpoint.dir and end, and only then is the job requeued."""
    stubs, task_logs, run_dir = tmp_path / "bin", tmp_path / "tasks", tmp_path / "run"
    stubs.mkdir()
    task_logs.mkdir()
    (stubs / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (stubs / "scontrol").write_text(FAKE_SCONTROL)
    for stub in ("srun", "scontrol"):
        (stubs / stub).chmod(0o755)
    stub_log = tmp_path / "stub.log"
    job = slurm_job_id()
    env = base_env(PATH=f"{stubs}:{os.environ['PATH']}", STUB_LOG=str(stub_log), STUB_TASK_LOGS=str(task_logs),
                   SLURM_JOB_ID=str(job), SLURM_JOB_NAME="clip", SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="2",
                   SLURM_CPUS_PER_TASK="1", SLURM_SUBMIT_DIR=REPO, ENVIRONMENT="BATCH",
                   CONFIG="configs/clip/tiny.yaml", RUN_DIR=str(run_dir))
    overrides = [*(o for o in TINY[2:] if not o.startswith("trainer.max_steps=")),
                 f"data.synthetic.out_dir={shapes}", "trainer.global_batch_size=16", "trainer.max_steps=100000"]
    batch = subprocess.Popen(["bash", "examples/slurm/pretrain_clip.sbatch", *overrides], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + RUN_TIMEOUT
        while not re.search(r"step \d+/100000", (task_logs / "task0.log").read_text()
                            if (task_logs / "task0.log").exists() else ""):
            assert batch.poll() is None and time.time() < deadline, "training never started"
            time.sleep(0.2)
        batch.send_signal(signal.SIGUSR1)
        out, _ = batch.communicate(timeout=120)
    finally:
        if batch.poll() is None:
            os.killpg(batch.pid, signal.SIGKILL)
    task0 = (task_logs / "task0.log").read_text()
    assert "launched by slurm" in task0 and "DP=2" in task0, task0
    assert re.search(r"preempted by SIGUSR1 at step \d+: checkpoint", task0), task0 + out
    assert any(p.name.startswith("step_") for p in (run_dir / "checkpoints").iterdir())
    lines = stub_log.read_text().splitlines()
    assert lines[0].startswith("srun --nodes=1 --ntasks-per-node=2") and "checkpoint.resume=auto" in lines[0]
    assert lines[1:] == [f"scontrol requeue {job}"], out
