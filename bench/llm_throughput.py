"""LLM training throughput on CPU: tokens/s and model FLOP utilisation (MFU) of this engine for the
`tiny` LLM and a ~100M-parameter shape, at TP=1 DP=2 and TP=2 DP=1 on 2 processes (fp32), the same
global batch at both layouts.

    python bench/llm_throughput.py                       # both shapes, both layouts
    python bench/llm_throughput.py --models tiny --steps 20
    (default timed steps: tiny 10 after 2 warm-up, 100m 4 after 1: about 10 CPU-s per step and rank)

Each run is `examples/pretrain_llm.py` under torchrun (2 ranks x 1 thread) on the synthetic Markov
corpus, evaluation off, for `--warmup` untimed steps and `--steps` timed ones. Every rank records
each step's wall time and its own process CPU time (bench/_llm_rank.py wraps the trainer's
`train_step`). On a shared machine the wall time measures the share the run got; the CPU time is what
the step cost this rank, close to the wall time the step would take with the 2 cores to itself (it
leaves out time a rank waits for the other, which on 2 idle cores is short).

FLOPs per sequence of S tokens (engine/flops.py `gpt_flops_per_token` x S, the family's
`llm_flops_per_sequence`): 6 * N * S + 12 * L * d_attn * S^2, N the matmul parameters (layer
linears + the logit projection), L layers, d_attn = heads x head_dim; forward + backward, causal attention not discounted, as PaLM and Megatron-LM count.
MFU = (FLOPs per step / step time) / peak, peak = cores x clock x FP32 FLOPs per cycle per core
(given by --peak-gflops; default 2 x 2.6 GHz x 32 for the 2 AMD EPYC (Zen 4) cores this was written
on: 2 FMA pipes of 256 bits = 16 fp32 FMAs per cycle). Prints a table and writes it to
bench/results/llm_throughput_cpu.md (+ .json). Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from report import write_report  # noqa: E402

CORPUS = ["data.synthetic.num_words=32", "data.synthetic.branching=4", "data.synthetic.num_train=2000",
          "data.synthetic.num_eval=0", "data.synthetic.docs_per_shard=500"]
MODELS = {
    # configs/llm/tiny.yaml as it is (the demo's model).
    "tiny": {"overrides": [], "batch": 32, "steps": 10, "warmup": 2},
    # ~100M parameters: 12 layers of 768 (12 heads, 4 key/value groups, SwiGLU 2048), a 32000-row tied
    # embedding, 256-token sequences.
    "100m": {"overrides": ["model.num_layers=12", "model.hidden_size=768", "model.ffn_hidden_size=2048",
                           "model.num_attention_heads=12", "model.num_query_groups=4", "model.seq_length=256",
                           "model.vocab_size=32000", "model.make_vocab_size_divisible_by=128"], "batch": 4,
             "steps": 4, "warmup": 1},
}
LAYOUTS = [(1, 2), (2, 1)]  # (TP, DP) on 2 processes


def model_config(overrides: list[str]):
    from engine.config import load_config
    from engine.schema import BARE_KEYS
    from models.llm.config import LLMExperimentConfig

    return load_config(LLMExperimentConfig, os.path.join(ROOT, "configs/llm/tiny.yaml"), overrides, BARE_KEYS).model


def parameter_count(cfg) -> int:
    """Every parameter of the TP=1 model (true vocabulary rows; the tied matrix once)."""
    h, d = cfg.hidden_size, cfg.head_dim
    layer = 2 * h + h * (cfg.num_attention_heads + 2 * cfg.query_groups) * d + cfg.num_attention_heads * d * h
    layer += 3 * h * cfg.ffn_hidden_size
    embeddings = cfg.vocab_size * h * (1 if cfg.share_embeddings_and_output_weights else 2)
    return cfg.num_layers * layer + h + embeddings


def run(model: str, tp: int, dp: int, steps: int, warmup: int, corpus: str) -> dict:
    spec = MODELS[model]
    batch = spec["batch"]  # the same global batch at every layout
    micro = batch // dp
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(HERE, "_llm_rank.py"), "--config", os.path.join(ROOT, "configs/llm/tiny.yaml"),
               *CORPUS, *spec["overrides"], f"data.synthetic.out_dir={corpus}", f"tensor_model_parallel_size={tp}",
               f"trainer.micro_batch_size={micro}", f"trainer.global_batch_size={batch}",
               f"trainer.max_steps={steps + warmup}", "trainer.log_every_n_steps=1", "trainer.val_check_interval=0",
               "optim.sched.warmup_steps=0", "device=cpu", "checkpoint.save_at_end=false",
               f"trainer.output_dir={out}"]
        env = {**os.environ, "LLM_BENCH_TIMES": os.path.join(out, "times")}
        load_before = os.getloadavg()[0]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        load_after = os.getloadavg()[0]
        if proc.returncode != 0:
            raise RuntimeError(f"engine run failed:\n{proc.stderr[-4000:]}")
        ranks = []
        for rank in range(2):
            with open(os.path.join(out, "times", f"rank{rank}.json")) as fh:
                ranks.append(json.load(fh))
    # A step takes as long as its slowest rank; steps after the warm-up.
    wall = [max(r["wall"][i] for r in ranks) for i in range(warmup, steps + warmup)]
    cpu = [max(r["cpu"][i] for r in ranks) for i in range(warmup, steps + warmup)]
    cfg = model_config(spec["overrides"])
    from models.llm.family import llm_flops_per_sequence

    step_flops = llm_flops_per_sequence(cfg) * batch
    tokens = batch * cfg.seq_length
    wall_s, cpu_s = sum(wall) / len(wall), sum(cpu) / len(cpu)
    return {"model": model, "tp": tp, "dp": dp, "params": parameter_count(cfg), "seq_length": cfg.seq_length,
            "global_batch": batch, "tokens_per_step": tokens, "flops_per_step": step_flops,
            "wall_step_s": wall_s, "cpu_step_s": cpu_s, "tokens_per_s_wall": tokens / wall_s,
            "tokens_per_s_cpu": tokens / cpu_s, "tflops_wall": step_flops / wall_s / 1e12,
            "tflops_cpu": step_flops / cpu_s / 1e12, "load_before": load_before, "load_after": load_after,
            "timed_steps": len(wall)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


NOTE = """
Wall: the measured step time (the slowest rank's), on a machine shared with other jobs, so it shows the
share of the 2 cores the run got. CPU time: the slowest rank's own process CPU time per step, close to
the step time on 2 idle cores (it leaves out waits for the other rank). MFU = model FLOPs per second /
peak; the same global batch at both layouts. The peak takes the nominal clock (2.6 GHz: BogoMIPS / 2
under KVM); if the cores boost higher the true peak is higher and MFU lower by the same factor. The
load average counts every runnable task on the host, so it overstates how much of the 2 cores the
run lost (compare wall with CPU time)."""


def table(rows: list[dict], peak: float, header: str) -> str:
    lines = [header, "",
             "| model | params | layout | tokens/step | wall s/step | tokens/s (wall) | MFU (wall) | CPU s/step "
             "| tokens/s (CPU time) | MFU (CPU time) | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | TP={r['tp']} DP={r['dp']} | {r['tokens_per_step']} "
                     f"| {r['wall_step_s']:.3f} | {r['tokens_per_s_wall']:.0f} | {r['tflops_wall'] * 1e12 / peak:.1%} "
                     f"| {r['cpu_step_s']:.3f} | {r['tokens_per_s_cpu']:.0f} | {r['tflops_cpu'] * 1e12 / peak:.1%} "
                     f"| {r['load_before']:.0f}-{r['load_after']:.0f} |")
    return "\n".join(lines) + "\n" + NOTE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,100m")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: per model)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: per model)")
    parser.add_argument("--peak-gflops", type=float, default=2 * 2.6 * 32, help="peak FP32 GFLOP/s of the machine")
    parser.add_argument("--corpus", default=os.path.join(ROOT, "data_cache/bench_markov"))
    parser.add_argument("--out", default=os.path.join(HERE, "results/llm_throughput_cpu"))
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    for model in args.models.split(","):
        for tp, dp in LAYOUTS:
            steps = args.steps if args.steps is not None else MODELS[model]["steps"]
            warmup = args.warmup if args.warmup is not None else MODELS[model]["warmup"]
            rows.append(run(model, tp, dp, steps, warmup, args.corpus))
            print(json.dumps(rows[-1]), flush=True)
    import torch

    header = (f"LLM fp32 training throughput, CPU: {platform.machine()}, {os.cpu_count()} cores "
              f"({cpu_name()}), shared with other jobs (load average per run in the last "
              f"column), torch {torch.__version__}, 2 ranks x 1 thread, "
              + ", ".join(f"{r['model']} {r['timed_steps']} timed steps" for r in rows[::2])
              + f" after warm-up, {started}. Peak {args.peak_gflops:.1f} GFLOP/s. FLOPs per sequence "
              "6*N*S + 12*L*d_attn*S^2 (engine/flops.py).")
    write_report(args.out, table(rows, args.peak_gflops * 1e9, header),
                 {"rows": rows, "peak_gflops": args.peak_gflops, "started": started})


if __name__ == "__main__":
    main()
