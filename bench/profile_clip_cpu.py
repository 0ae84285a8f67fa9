"""Where the training step's time goes, engine beside open_clip's own trainer, on CPU (py-spy).

    bench/.venv-openclip/bin/python bench/profile_clip_cpu.py --model b32 --layouts 1x2,2x1 --steps 6

Each system runs as in bench/clip_throughput.py (same shards, dims, batch, fp32, 2 cores) under
`py-spy record --idle --subprocesses --format raw`, so time spent waiting (in a collective, on the
other rank) is sampled too. Only samples of the training loop's thread inside a step are kept
(frames under `Trainer.train_step` for the engine, under `train_one_epoch` for open_clip). Each
sample is put in one category by its deepest frame that names one (data loading, forward,
contrastive loss, backward, TP communication, DP gradient all-reduce, optimizer, grad norm, ...).
Writes bench/results/profile_clip_cpu.{md,json}. Not a test.
"""
from __future__ import annotations

import argparse
import collections
import os
import platform
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from clip_throughput import MODELS, SHARD_SET, engine_overrides, openclip_args, openclip_dims  # noqa: E402
from engine_runner import run_engine  # noqa: E402
from openclip_trainer import run_openclip_trainer  # noqa: E402
from report import write_report  # noqa: E402

# (category, substrings of a frame): the deepest frame of a sample that matches decides.
CATEGORIES = [
    ("data loading", ("data/pipeline.py", "data/transforms.py", "data/tokenizers.py", "webdataset/",
                      "open_clip_train/data.py", "torchvision/transforms", "PIL/", "open_clip/tokenizer.py",
                      "torch/utils/data/")),
    ("TP communication", ("tensor_parallel/mappings.py",)),
    ("DP gradient all-reduce", ("parallel/data_parallel.py",)),
    ("grad norm / clipping", ("engine/grad_norm.py", "clip_grad")),
    ("optimizer (AdamW)", ("torch/optim/", "engine/distributed_optimizer.py")),
    ("contrastive loss (+DP feature gather)", ("models/clip/loss.py", "open_clip/loss.py", "parallel/collectives.py")),
    ("backward", ("backward (engine/schedules.py", "torch/autograd/", "backward (torch/_tensor.py")),
    ("forward", ("forward_step", "stage_forward", "open_clip/model.py", "open_clip/transformer.py",
                 "torch/nn/modules/")),
    ("step bookkeeping (metrics all-reduce, LR)", ("train_step (engine/trainer.py", "engine/optim.py",
                                                   "open_clip_train/train.py", "scheduler.py")),
]
STEP_FRAMES = {"engine": "train_step (engine/trainer.py", "open_clip": "train_one_epoch ("}


def categorize(frames: list[str]) -> str:
    for frame in reversed(frames):  # deepest first
        for name, patterns in CATEGORIES:
            if any(p in frame for p in patterns):
                return name
    return "other"


def summarize(raw_file: str, system: str) -> dict:
    """Per process: {category: samples}; processes are told apart by py-spy's root frame."""
    marker = STEP_FRAMES[system]
    per_process: dict = collections.defaultdict(collections.Counter)
    with open(raw_file) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            if not any(marker in f for f in frames):
                continue
            process = frames[0] if frames[0].startswith("process") else "main"
            per_process[process.split(":")[0]][categorize(frames)] += int(count)
    return {proc: dict(counts) for proc, counts in per_process.items()}


def merge(per_process: dict) -> collections.Counter:
    total = collections.Counter()
    for counts in per_process.values():
        total.update(counts)
    return total


def py_spy(out_file: str, rate: int) -> list[str]:
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        exe = "/work/main/.venv/bin/py-spy"
    return [exe, "record", "--idle", "--subprocesses", "--format", "raw", "--rate", str(rate), "-o", out_file, "--"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="b32", choices=sorted(MODELS))
    parser.add_argument("--layouts", default="1x2,2x1", help="TPxDP for the engine, comma separated")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rate", type=int, default=25, help="py-spy samples per second")
    parser.add_argument("--shards", default=os.path.join(ROOT, "data_cache/bench_shapes"))
    parser.add_argument("--skip-open-clip", action="store_true")
    parser.add_argument("--extra", default="", help="engine overrides added to every run, space separated")
    parser.add_argument("--out", default=os.path.join(HERE, "results/profile_clip_cpu"))
    args = parser.parse_args()
    from data.synthetic import generate_shapes_dataset

    generate_shapes_dataset(args.shards, **SHARD_SET)
    shard_spec = os.path.join(args.shards, "train-{000000..000007}.tar")
    batch = MODELS[args.model]["batch"]
    tmp = tempfile.mkdtemp(prefix="profile_clip_")
    profiles = {}
    try:
        if not args.skip_open_clip:
            raw = os.path.join(tmp, "open_clip.txt")
            res = run_openclip_trainer(shard_spec, args.steps, batch, warmup_steps=1, threads=2,
                                       dims=openclip_dims(os.path.join(ROOT, MODELS[args.model]["config"])),
                                       extra_args=openclip_args(os.path.join(ROOT, MODELS[args.model]["config"])),
                                       prefix=py_spy(raw, args.rate))
            profiles["open_clip_train (1 proc x 2 threads)"] = {"step_time_s": res["step_time_s"],
                                                                "processes": summarize(raw, "open_clip")}
        for layout in args.layouts.split(","):
            tp, dp = (int(x) for x in layout.split("x"))
            raw = os.path.join(tmp, f"engine_{layout}.txt")
            overrides = engine_overrides(args.model, tp, dp) + args.extra.split()
            res = run_engine(MODELS[args.model]["config"], tp * dp, overrides, args.steps, 1, args.shards,
                             python=sys.executable, prefix=py_spy(raw, args.rate))
            profiles[f"engine TP={tp} DP={dp}"] = {"step_time_s": res["step_time_s"],
                                                   "processes": summarize(raw, "engine")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    names = [c for c, _ in CATEGORIES] + ["other"]
    header = (f"Where a CLIP {args.model} fp32 training step's time goes on CPU ({platform.machine()}, {os.cpu_count()} "
              f"cores, shared with other sessions), py-spy --idle at {args.rate} Hz over {args.steps} steps, main "
              f"thread of each process, samples inside a step only; engine: share of all ranks' samples")
    systems = list(profiles)
    lines = [header, "", "| category | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    totals = {s: merge(profiles[s]["processes"]) for s in systems}
    for name in names:
        cells = []
        for s in systems:
            n = sum(totals[s].values()) or 1
            share = totals[s].get(name, 0) / n
            cells.append(f"{100 * share:.1f}% ({share * profiles[s]['step_time_s']:.2f} s)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| step time (s, with py-spy attached) | " +
                 " | ".join(f"{profiles[s]['step_time_s']:.2f}" for s in systems) + " |")
    write_report(args.out, "\n".join(lines), {"header": header, "profiles": profiles})


if __name__ == "__main__":
    main()
