"""Run this engine's `examples/pretrain_clip.py` under torchrun for a few timed steps (benchmarks only)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_RE = re.compile(r"step (\d+)/\d+ .*\| ([0-9.]+) s/step")
BUBBLE_RE = re.compile(r"step (\d+)/\d+ \| pipeline bubble ([0-9.]+)")


def timing_overrides(steps: int, shards_dir: str, output_dir: str) -> list[str]:
    """Log every step, no evaluation, synthetic shards from `shards_dir`, CPU."""
    return [f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "trainer.val_check_interval=0",
            "eval.zero_shot=false", "eval.retrieval=false", f"data.synthetic.out_dir={shards_dir}",
            f"trainer.output_dir={output_dir}", "device=cpu", "checkpoint.save_at_end=false"]


def run_engine(config: str, nproc: int, overrides: list[str], steps: int, warmup: int, shards_dir: str,
               python: str = sys.executable) -> dict:
    """Train `steps` steps; return the step times after `warmup` and the run's final_metrics.json."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               os.path.join(ROOT, "examples/pretrain_clip.py"), "--config", os.path.join(ROOT, config),
               *timing_overrides(steps, shards_dir, out), *overrides]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"engine run failed:\n{proc.stderr[-4000:]}")
        with open(os.path.join(out, "final_metrics.json")) as fh:
            final = json.load(fh)
    log = proc.stderr + proc.stdout
    times = [float(t) for step, t in STEP_RE.findall(log) if int(step) > warmup]
    bubbles = [float(b) for step, b in BUBBLE_RE.findall(log) if int(step) > warmup]
    return {"step_times": times, "step_time_s": sum(times) / len(times), "final": final,
            "bubble": sum(bubbles) / len(bubbles) if bubbles else None}
