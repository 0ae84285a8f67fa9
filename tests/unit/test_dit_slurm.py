"""examples/slurm/extract_embeddings.sbatch with stub srun/scontrol: one task per GPU running the
extraction with the user's arguments; near the time limit (USR1) the step is stopped and the job
requeued (the same command resumes, keeping finished chunks)."""
import os
import signal
import stat
import subprocess
import time

from tests.unit.test_launch import STUB_SCONTROL, STUB_SRUN

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBATCH = os.path.join(REPO, "examples", "slurm", "extract_embeddings.sbatch")
ARGS = ["--shards", "/data/{00000..00009}.tar", "--out", "/data/emb", "--condition-tower", "hf:/m/eva",
        "--target-tower", "hf:/m/clip"]


def _start(tmp_path, step_seconds, **env_extra):
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(stat.S_IRWXU)
    log = tmp_path / "stub.log"
    log.write_text("")
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log), "STUB_STEP_SECONDS": str(step_seconds),
           "SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "6",
           "SLURM_SUBMIT_DIR": str(tmp_path), **env_extra}
    proc = subprocess.Popen(["bash", SBATCH, *ARGS], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 20
    while "srun " not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    return proc, log


def test_one_task_per_gpu_with_the_arguments_and_no_requeue_when_done(tmp_path):
    proc, log = _start(tmp_path, 0.2)
    out, _ = proc.communicate(timeout=30)
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, out
    assert lines[0] == ("srun --nodes=2 --ntasks-per-node=4 --cpus-per-task=6 python -u examples/extract_embeddings.py "
                        + " ".join(ARGS))
    assert not any(line.startswith("scontrol") for line in lines)


def test_usr1_stops_the_step_and_requeues(tmp_path):
    proc, log = _start(tmp_path, 30)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert log.read_text().splitlines()[1:] == ["step got TERM", "scontrol requeue 77"], out
