"""Run one of this engine's training entry points (`examples/pretrain_clip.py` by default, any family's
`examples/pretrain_*.py`) under torchrun for a few timed steps (benchmarks only)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_RE = re.compile(r"step (\d+)/\d+ .*\| ([0-9.]+) s/step")
BUBBLE_RE = re.compile(r"step (\d+)/\d+ \| pipeline bubble ([0-9.]+)")
MFU_RE = re.compile(r"step (\d+)/\d+ .*\| MFU ([0-9.]+)%")
PEAK_MEM_RE = re.compile(r"step (\d+)/\d+ .*\| peak mem ([0-9.]+) GiB")


def run_process_group(cmd: list[str], timeout: float | None, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` with captured text output, in a session of its own, so that a timeout ends
    the launcher's children too (torchrun's ranks), not only the launcher."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def generic_timing_overrides(steps: int, output_dir: str, device: str = "cpu") -> list[str]:
    """The keys every family shares: log every step, no periodic evaluation, no final save, on `device`."""
    return [f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "trainer.val_check_interval=0",
            f"trainer.output_dir={output_dir}", f"device={device}", "checkpoint.save_at_end=false"]


def timing_overrides(steps: int, shards_dir: str, output_dir: str, device: str = "cpu") -> list[str]:
    """CLIP's: the generic ones, no zero-shot or retrieval evaluation, synthetic shards from `shards_dir`."""
    return [*generic_timing_overrides(steps, output_dir, device), "eval.zero_shot=false", "eval.retrieval=false",
            f"data.synthetic.out_dir={shards_dir}"]


def run_engine(config: str, nproc: int, overrides: list[str], steps: int, warmup: int, shards_dir: str | None,
               python: str = sys.executable, prefix: tuple = (), env: dict | None = None, device: str = "cpu",
               timeout: float | None = None, root: str = ROOT, script: str = "examples/pretrain_clip.py") -> dict:
    """Train `steps` steps; return the step times after `warmup`, the logged MFU and peak memory
    (GPU) and the run's final_metrics.json. `prefix` goes before the launch command (a profiler
    such as `py-spy record ... --`); `root` is the engine checkout to run (another version of it, to
    compare two versions in one benchmark). `script`: the family's entry point; CLIP's gets its
    evaluation switched off and `shards_dir` as its synthetic set, another family only the generic
    keys (its data and evaluation settings come in `overrides`; `shards_dir` is then unused)."""
    with tempfile.TemporaryDirectory() as out:
        timing = (timing_overrides(steps, shards_dir, out, device) if script.endswith("pretrain_clip.py")
                  else generic_timing_overrides(steps, out, device))
        cmd = [*prefix, python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               os.path.join(root, script), "--config", os.path.join(root, config), *timing, *overrides]
        env = {**os.environ, **(env or {})}
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        proc = run_process_group(cmd, timeout, cwd=root, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"engine run failed:\n{proc.stderr[-4000:]}")
        with open(os.path.join(out, "final_metrics.json")) as fh:
            final = json.load(fh)
    log = proc.stderr + proc.stdout
    times = [float(t) for step, t in STEP_RE.findall(log) if int(step) > warmup]
    bubbles = [float(b) for step, b in BUBBLE_RE.findall(log) if int(step) > warmup]
    mfu = [float(m) / 100 for step, m in MFU_RE.findall(log) if int(step) > warmup]
    peak = [float(m) for _, m in PEAK_MEM_RE.findall(log)]
    return {"step_times": times, "step_time_s": sum(times) / len(times), "final": final,
            "bubble": sum(bubbles) / len(bubbles) if bubbles else None,
            "mfu_logged": sum(mfu) / len(mfu) if mfu else None, "peak_memory_gib": max(peak) if peak else None,
            "log_tail": log[-3000:]}
