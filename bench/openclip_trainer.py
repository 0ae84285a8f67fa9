#!/usr/bin/env python3
"""Run open_clip's real trainer (``open_clip_train.main``) on CPU and measure throughput.

This module is stdlib-only: it can be imported/run from any interpreter. It launches
``python -m open_clip_train.main`` as a subprocess inside ``bench/.venv-openclip``
(created by ``bench/setup_openclip_env.sh``), with a custom model config written to a
temporary ``local-dir:`` model folder (``<tmp>/model/open_clip_config.json``), which
open_clip >= 2.32 / 3.x resolves for both the model and the tokenizer -- no edit of the
installed package and no wrapper around ``main`` is needed.

Timing: the trainer is run with ``--log-every-n-steps 1``, so every step logs one line

    Train Epoch: 0 [ 64/320 (20%)] Data (t): 0.004 Batch (t): 0.211, 151.658/s, 151.658/s/gpu LR: ...

where ``Batch (t)`` is the wall time of that step (data loading in the main process for
``--workers 0`` + forward + backward + AdamW step), and ``X/s`` = batch / that time.
We take the per-step time as ``batch / (X/s)`` (6 significant digits instead of the 3
decimals of ``Batch (t)``), drop the first ``warmup_steps`` steps and report
``samples_per_s = batch * n / sum(step_times)`` and ``step_time_s = mean(step_times)``.

Threads: OMP_NUM_THREADS / MKL_NUM_THREADS are set to ``threads`` in the subprocess env
(default: os.cpu_count()). Use the same value for the project engine so both sides run
with identical intra-op parallelism.

CLI (prints one line of JSON):

    python bench/openclip_trainer.py --preset tiny --steps 10 --batch 32 \
        --train-data '/data/wds/train-{000000..000009}.tar' --threads 2
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VENV = os.path.join(HERE, ".venv-openclip")

# Tower dimensions. head_width = width / heads (open_clip's vision config is expressed
# in head_width; its text config in heads). vocab_size is 49408 for BOTH presets because
# open_clip's default tokenizer (its bundled OpenAI BPE, no download) emits ids up to
# 49407 (SOT=49406, EOT=49407); a 1000-token vocab would index out of range.
PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": {
        "embed_dim": 64,
        "vision": {"image_size": 64, "layers": 2, "width": 128, "head_width": 32,
                   "mlp_ratio": 4.0, "patch_size": 8},
        "text": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4,
                 "layers": 2},
    },
    "b32": {  # ViT-B/32
        "embed_dim": 512,
        "vision": {"image_size": 224, "layers": 12, "width": 768, "head_width": 64,
                   "mlp_ratio": 4.0, "patch_size": 32},
        "text": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                 "layers": 12},
    },
}

_LINE_RE = re.compile(
    r"Train Epoch: (?P<epoch>\d+) \[\s*(?P<n>\d+)/(?P<total>\d+) \([^)]*\)\] "
    r"Data \(t\): (?P<data_t>[0-9.]+) Batch \(t\): (?P<batch_t>[0-9.]+), "
    r"(?P<sps>[0-9.eE+-]+)/s"
)


def model_config(embed_dim: int, vision: Dict[str, Any], text: Dict[str, Any],
                 quick_gelu: bool = False) -> Dict[str, Any]:
    """open_clip CLIP model_cfg for a standard ViT image tower + transformer text tower.

    quick_gelu=False -> open_clip uses torch.nn.GELU (exact erf GELU), matching the
    project's towers. (open_clip's default for configs without "quick_gelu" is also False.)
    """
    v, t = dict(vision), dict(text)
    if "heads" in v and "head_width" not in v:
        v["head_width"] = v["width"] // v.pop("heads")
    v.pop("heads", None)
    return {
        "embed_dim": int(embed_dim),
        "quick_gelu": bool(quick_gelu),
        "vision_cfg": {
            "image_size": int(v["image_size"]),
            "layers": int(v["layers"]),
            "width": int(v["width"]),
            "head_width": int(v.get("head_width", 64)),
            "mlp_ratio": float(v.get("mlp_ratio", 4.0)),
            "patch_size": int(v["patch_size"]),
        },
        "text_cfg": {
            "context_length": int(t["context_length"]),
            "vocab_size": int(t.get("vocab_size", 49408)),
            "width": int(t["width"]),
            "heads": int(t["heads"]),
            "layers": int(t["layers"]),
        },
    }


def _venv_python(venv: str) -> str:
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        raise FileNotFoundError(f"{py} missing: run bench/setup_openclip_env.sh first")
    return py


def build_command(python: str, model_dir: str, train_data: str, steps: int, batch: int,
                  workers: int = 0, resampled: bool = True, lr: float = 5e-4,
                  seed: int = 0, extra_args: Optional[List[str]] = None,
                  precision: str = "fp32", device: str = "cpu") -> List[str]:
    cmd = [
        python, "-m", "open_clip_train.main",
        "--model", f"local-dir:{model_dir}",
        "--train-data", train_data,
        "--dataset-type", "webdataset",
        "--train-num-samples", str(steps * batch),
        "--batch-size", str(batch),
        "--epochs", "1",
        "--workers", str(workers),
        "--precision", precision,  # fp32, or amp_bf16 (autocast) on GPU
        "--device", device,
        # AdamW with CLIP-ViT hyper-params (open_clip only picks these when the model
        # name contains "vit", which a local-dir: name does not)
        "--lr", str(lr), "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
        "--wd", "0.2", "--warmup", "0", "--lr-scheduler", "const",
        "--seed", str(seed),
        "--log-every-n-steps", "1",
        "--save-frequency", "0",
        "--zeroshot-frequency", "0",
        "--val-frequency", "0",
        "--report-to", "",
        # `--logs none` (literally "none") makes main() set save_logs=False, so no
        # checkpoint is written at the end of the epoch (--save-frequency 0 alone would
        # still save the final epoch). The text log still goes to ./none/<name>/out.log
        # relative to cwd, which is the temp dir.
        "--logs", "none",
        "--name", "bench",
    ]
    if resampled:
        # sample shards with replacement: any steps*batch works even if the dataset is smaller
        cmd.append("--dataset-resampled")
    return cmd + list(extra_args or [])


def parse_log(text: str) -> List[Dict[str, float]]:
    rows = []
    for m in _LINE_RE.finditer(text):
        rows.append({"n": int(m["n"]), "total": int(m["total"]),
                     "data_t": float(m["data_t"]), "batch_t": float(m["batch_t"]),
                     "sps": float(m["sps"])})
    return rows


def run_openclip_trainer(train_data: str, steps: int, batch: int, preset: str = "tiny",
                         dims: Optional[Dict[str, Any]] = None, workers: int = 0,
                         threads: Optional[int] = None, warmup_steps: int = 2,
                         venv: str = DEFAULT_VENV, resampled: bool = True,
                         quick_gelu: bool = False, extra_args: Optional[List[str]] = None,
                         timeout: Optional[float] = None, keep_dir: bool = False,
                         verbose: bool = False, prefix: Optional[List[str]] = None,
                         precision: str = "fp32", device: str = "cpu",
                         python: Optional[str] = None) -> Dict[str, Any]:
    """Run open_clip_train.main for one epoch of steps*batch samples; return throughput.

    dims: optional overrides merged into the preset, e.g.
          {"embed_dim": 256, "vision": {"layers": 4}, "text": {"width": 256}}.
    prefix: put before the command (a profiler such as `py-spy record ... --`).
    precision/device: open_clip's --precision and --device (GPU: "amp_bf16", "cuda").
    python: the interpreter that has open_clip_train (default: the venv's).
    Returns {samples_per_s, step_time_s, steps, batch, ...}.
    """
    cfg = copy.deepcopy(PRESETS[preset])
    for k, v in (dims or {}).items():
        if isinstance(v, dict):
            cfg.setdefault(k, {}).update(v)
        else:
            cfg[k] = v
    mcfg = model_config(cfg["embed_dim"], cfg["vision"], cfg["text"], quick_gelu=quick_gelu)
    if steps <= warmup_steps:
        raise ValueError(f"steps ({steps}) must exceed warmup_steps ({warmup_steps})")
    threads = int(threads or os.cpu_count() or 1)
    python = python or _venv_python(venv)

    tmp = tempfile.mkdtemp(prefix="openclip_bench_")
    try:
        model_dir = os.path.join(tmp, "model")
        os.makedirs(model_dir)
        with open(os.path.join(model_dir, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": mcfg}, f, indent=2)
        cmd = build_command(python, model_dir, train_data, steps, batch, workers=workers,
                            resampled=resampled, extra_args=extra_args, precision=precision, device=device)
        cmd = list(prefix or []) + cmd
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                            "SLURM_NTASKS", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE",
                            "PMI_SIZE", "WANDB_MODE")}
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        load_before = os.getloadavg()[0]
        t0 = time.time()
        # A session of its own: a timeout ends the trainer's data-loader workers too.
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        wall = time.time() - t0
        if verbose:
            sys.stderr.write(out)
        rows = parse_log(out)
        if proc.returncode != 0 or len(rows) < steps:
            tail = "\n".join(out.splitlines()[-30:])
            raise RuntimeError(f"open_clip trainer failed (rc={proc.returncode}, "
                               f"{len(rows)}/{steps} steps logged):\n{tail}")
        timed = rows[warmup_steps:]
        step_times = [batch / r["sps"] for r in timed]
        total = sum(step_times)
        return {
            "samples_per_s": batch * len(timed) / total,
            "step_time_s": total / len(timed),
            "steps": len(timed),
            "batch": batch,
            "warmup_steps": warmup_steps,
            "data_time_s": sum(r["data_t"] for r in timed) / len(timed),
            "step_times_s": [round(x, 6) for x in step_times],
            "threads": threads,
            "workers": workers,
            "preset": preset,
            "model_cfg": mcfg,
            "wall_s": round(wall, 2),
            # 1-min load average before/after: a value well above `threads` means another
            # process competed for the cores and the numbers are not trustworthy.
            "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "command": cmd,
            **({"tmp_dir": tmp} if keep_dir else {}),
        }
    finally:
        if not keep_dir:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-data", required=True,
                   help="WebDataset shard pattern, e.g. 'dir/train-{000000..000009}.tar'")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="global batch size")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS/MKL_NUM_THREADS for the trainer (default: cpu count)")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps excluded from timing")
    p.add_argument("--venv", default=DEFAULT_VENV)
    p.add_argument("--no-resampled", action="store_true",
                   help="read shards once in order (dataset must hold >= steps*batch samples)")
    p.add_argument("--quick-gelu", action="store_true", help="use QuickGELU (default: exact GELU)")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--keep-dir", action="store_true")
    p.add_argument("--verbose", action="store_true", help="echo trainer output to stderr")
    # dimension overrides
    p.add_argument("--embed-dim", type=int)
    for name in ("image-size", "layers", "width", "head-width", "patch-size"):
        p.add_argument(f"--vision-{name}", type=int)
    p.add_argument("--vision-mlp-ratio", type=float)
    for name in ("context-length", "vocab-size", "width", "heads", "layers"):
        p.add_argument(f"--text-{name}", type=int)
    a = p.parse_args(argv)

    dims: Dict[str, Any] = {"vision": {}, "text": {}}
    if a.embed_dim is not None:
        dims["embed_dim"] = a.embed_dim
    for k in ("image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"):
        v = getattr(a, f"vision_{k}")
        if v is not None:
            dims["vision"][k] = v
    for k in ("context_length", "vocab_size", "width", "heads", "layers"):
        v = getattr(a, f"text_{k}")
        if v is not None:
            dims["text"][k] = v

    res = run_openclip_trainer(a.train_data, a.steps, a.batch, preset=a.preset, dims=dims,
                               workers=a.workers, threads=a.threads,
                               warmup_steps=a.warmup_steps, venv=a.venv,
                               resampled=not a.no_resampled, quick_gelu=a.quick_gelu,
                               timeout=a.timeout, keep_dir=a.keep_dir, verbose=a.verbose)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
