"""Step time of TP, PP and DP layouts of one global batch, and the measured 1F1B bubble against
(p - 1) / (m + p - 1), on CPU (2 ranks: one per core).

    python bench/pipeline_layouts.py [--steps 8] [--warmup 3] [--micro-batches 1,2,4,8]

The model is the tiny CLIP with 4 layers per tower (2 per stage at PP=2). The bubble is what the
trainer logs at PP > 1: the share of each stage's schedule wall time not spent in its own forward
and backward compute, averaged over stages, so it holds communication and imbalance between the
stages as well as the schedule's idle slots. Not a test; writes bench/results/pipeline_cpu.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from engine_runner import run_engine  # noqa: E402

CONFIG = "configs/clip/tiny.yaml"
MODEL = ["model.vision.num_layers=4", "model.text.num_layers=4", "data.shuffle_buffer=64"]
LAYOUTS = {  # name -> overrides, on 2 processes
    "DP=2": ["tensor_model_parallel_size=1", "pipeline_model_parallel_size=1"],
    "TP=2": ["tensor_model_parallel_size=2", "pipeline_model_parallel_size=1"],
    "TP=2 +SP": ["tensor_model_parallel_size=2", "sequence_parallel=true"],
    "PP=2": ["pipeline_model_parallel_size=2"],
}


def batch_overrides(global_batch: int, micro_batches: int, dp: int) -> list[str]:
    return [f"trainer.global_batch_size={global_batch}",
            f"trainer.micro_batch_size={global_batch // (micro_batches * dp)}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--micro-batches", default="1,2,4,8", help="M values for the bubble sweep at PP=2")
    parser.add_argument("--shards", default=os.path.join(ROOT, "data_cache/bench_shapes"))
    args = parser.parse_args()
    gb = args.global_batch

    layout_rows = []
    for name, overrides in LAYOUTS.items():
        dp = 2 if name.startswith("DP") else 1
        micro = 4  # the same 4 micro-batches per step everywhere (PP needs several to fill)
        res = run_engine(CONFIG, 2, MODEL + overrides + batch_overrides(gb, micro, dp), args.steps, args.warmup,
                         args.shards)
        layout_rows.append({"layout": name, "micro_batches": micro, "step_time_s": res["step_time_s"],
                            "bubble": res["bubble"]})
        print(f"{name:10s} M={micro} {res['step_time_s']:.3f} s/step", flush=True)

    bubble_rows = []
    for m in (int(x) for x in args.micro_batches.split(",")):
        res = run_engine(CONFIG, 2, MODEL + LAYOUTS["PP=2"] + batch_overrides(gb, m, 1), args.steps, args.warmup,
                         args.shards)
        p = 2
        bubble_rows.append({"micro_batches": m, "step_time_s": res["step_time_s"], "measured": res["bubble"],
                            "formula": (p - 1) / (m + p - 1)})
        print(f"PP=2 M={m}: bubble {res['bubble']:.3f} (formula {(p - 1) / (m + p - 1):.3f}), "
              f"{res['step_time_s']:.3f} s/step", flush=True)

    lines = [f"# Parallel layouts and pipeline bubble on CPU ({platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, 2 ranks, gloo)", "",
             f"Tiny CLIP, 4 layers per tower, global batch {gb}, {args.steps} steps ({args.warmup} warm-up "
             "steps dropped). Produced by `python bench/pipeline_layouts.py`.", "",
             "| layout | micro-batches | s/step | ratio vs DP=2 | bubble |", "|---|---|---|---|---|"]
    base = layout_rows[0]["step_time_s"]
    for r in layout_rows:
        bubble = f"{r['bubble']:.3f}" if r["bubble"] is not None else "-"
        lines.append(f"| {r['layout']} | {r['micro_batches']} | {r['step_time_s']:.3f} | "
                     f"{r['step_time_s'] / base:.2f}x | {bubble} |")
    lines += ["", "| PP=2, micro-batches m | s/step | measured bubble | (p-1)/(m+p-1) |", "|---|---|---|---|"]
    for r in bubble_rows:
        lines.append(f"| {r['micro_batches']} | {r['step_time_s']:.3f} | {r['measured']:.3f} | {r['formula']:.3f} |")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "pipeline_cpu.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(HERE, "results", "pipeline_cpu.json"), "w") as fh:
        json.dump({"layouts": layout_rows, "bubble": bubble_rows}, fh, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
