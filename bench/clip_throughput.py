"""CLIP training throughput on CPU: this engine at TP=1 DP=2 and TP=2 DP=1 beside open_clip's own
trainer (`open_clip_train`) on the same synthetic shards, tower dimensions, global batch and fp32.

    bash bench/setup_openclip_env.sh              # once: a venv with open_clip + torchvision
    bench/.venv-openclip/bin/python bench/clip_throughput.py --models tiny,b32

Both sides run in that venv, so they use the same torch build. Both use the 2 cores: the engine as
2 ranks x 1 thread (torchrun's default), open_clip as 1 process x 2 threads. The text vocabulary is
49408 on both sides (open_clip's tokenizer ids need it). The first `--warmup` steps are not timed.
Prints a table and writes it to bench/results/clip_throughput_cpu.md (+ .json). Not a test.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from engine_runner import run_engine  # noqa: E402
from openclip_trainer import run_openclip_trainer  # noqa: E402
from report import write_report  # noqa: E402

# Model presets: our config file + the global batch used for both sides.
MODELS = {
    "tiny": {"config": "configs/clip/tiny.yaml", "batch": 128},
    "b32": {"config": "configs/clip/b32.yaml", "batch": 16},
}
LAYOUTS = [(1, 2), (2, 1)]  # (TP, DP) on 2 processes
SHARD_SET = {"num_train": 4000, "num_eval": 100, "image_size": 64, "samples_per_shard": 500}
# the engine reuses the shards written here instead of writing its default set over them
SHARD_OVERRIDES = [f"data.synthetic.{key}={value}" for key, value in SHARD_SET.items()]


def engine_overrides(model: str, tp: int, dp: int) -> list[str]:
    batch = MODELS[model]["batch"]
    return [f"tensor_model_parallel_size={tp}", f"trainer.global_batch_size={batch}",
            f"trainer.micro_batch_size={batch // dp}", "model.text.vocab_size=49408",
            "optim.sched.warmup_steps=0", "data.shuffle_buffer=256", *SHARD_OVERRIDES]


def openclip_dims(config_path: str) -> dict:
    """Our tower dimensions in open_clip's terms, read from the same config file."""
    from engine.config import load_config
    from models.clip.config import CLIPExperimentConfig as ExperimentConfig

    cfg = load_config(ExperimentConfig, config_path)
    v, t = cfg.model.vision, cfg.model.text
    return {"embed_dim": cfg.model.output_dim,
            "vision": {"image_size": v.img_h, "layers": v.num_layers, "width": v.hidden_size,
                       "head_width": v.hidden_size // v.num_attention_heads,
                       "mlp_ratio": v.ffn_hidden_size / v.hidden_size, "patch_size": v.patch_dim},
            "text": {"context_length": t.encoder_seq_length, "vocab_size": 49408, "width": t.hidden_size,
                     "heads": t.num_attention_heads, "layers": t.num_layers}}


def openclip_args(config_path: str) -> list[str]:
    """open_clip_train flags for the config's training settings that open_clip does not share by default:
    gradient clipping (open_clip clips only when asked; the engine's CLIP configs clip at 1.0), so both
    sides do the same work per step."""
    from engine.config import load_config
    from models.clip.config import CLIPExperimentConfig as ExperimentConfig

    clip = load_config(ExperimentConfig, config_path).trainer.gradient_clip_val
    return ["--grad-clip-norm", str(clip)] if clip else []


def median(values: list) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,b32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of (open_clip, every engine row) back to back; the table shows medians")
    parser.add_argument("--baseline-root", default=None,
                        help="another checkout of the engine (e.g. `git archive` of an older commit) run in "
                             "every round too, as 'engine (baseline)'")
    parser.add_argument("--with-full-length-text", action="store_true",
                        help="also run the engine with model.text.trim_to_longest=false: the text tower on the "
                             "whole 77-token context, as open_clip runs it (the like-for-like kernel comparison)")
    parser.add_argument("--engines-only", action="store_true",
                        help="with --baseline-root: no open_clip runs; the last column compares with the baseline")
    parser.add_argument("--shards", default=os.path.join(ROOT, "data_cache/bench_shapes"))
    parser.add_argument("--out", default=os.path.join(HERE, "results/clip_throughput_cpu"))
    args = parser.parse_args()

    from data.synthetic import generate_shapes_dataset

    generate_shapes_dataset(args.shards, **SHARD_SET)
    shard_spec = os.path.join(args.shards, "train-{000000..000007}.tar")
    engines = [("engine", ROOT, [])]
    if args.with_full_length_text:
        engines.append(("engine, text at full length", ROOT, ["model.text.trim_to_longest=false"]))
    if args.baseline_root:
        engines.append(("engine (baseline)", os.path.abspath(args.baseline_root), []))
    runs = {}  # (model, system, layout) -> [{"step_time_s", "ratio", "loadavg"}] one per round
    for model in args.models.split(","):
        batch = MODELS[model]["batch"]
        for _ in range(args.repeats):
            ref = None
            if not args.engines_only:
                ref = run_openclip_trainer(shard_spec, args.steps, batch, preset="tiny",
                                           dims=openclip_dims(os.path.join(ROOT, MODELS[model]["config"])),
                                           extra_args=openclip_args(os.path.join(ROOT, MODELS[model]["config"])),
                                           threads=2, warmup_steps=args.warmup)
                key = (model, "open_clip_train (1 proc x 2 threads)", "-")
                runs.setdefault(key, []).append({"step_time_s": ref["step_time_s"], "ratio": 1.0,
                                                 "loadavg": os.getloadavg()[0]})
            for tp, dp in LAYOUTS:
                # the baseline first, so neither version always runs right after open_clip
                for name, root, extra in reversed(engines) if args.engines_only else engines:
                    res = run_engine(MODELS[model]["config"], tp * dp, engine_overrides(model, tp, dp) + extra,
                                     args.steps, args.warmup, args.shards, python=sys.executable, root=root)
                    if ref is None:  # compare with the baseline of this round
                        ref = {"step_time_s": res["step_time_s"]} if name == "engine (baseline)" else ref
                    key = (model, f"{name} (2 ranks x 1 thread)", f"TP={tp} DP={dp}")
                    runs.setdefault(key, []).append({"step_time_s": res["step_time_s"],
                                                     "ratio": ref["step_time_s"] / res["step_time_s"],
                                                     "loadavg": os.getloadavg()[0]})
                    print(f"{key}: {runs[key][-1]}", flush=True)
                if args.engines_only:
                    ref = None
    rows = []
    for (model, system, layout), rounds in runs.items():
        times = [r["step_time_s"] for r in rounds]
        step = median(times)
        rows.append({"model": model, "system": system, "layout": layout, "batch": MODELS[model]["batch"],
                     "step_time_s": step, "samples_per_s": MODELS[model]["batch"] / step,
                     "ratio": median([r["ratio"] for r in rounds]), "rounds": rounds,
                     "spread": (min(times), max(times))})
    import torch

    loads = [r["loadavg"] for rounds in runs.values() for r in rounds]
    header = (f"CLIP fp32 training throughput, CPU: {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__}, {args.steps - args.warmup} timed steps "
              f"after {args.warmup} warm-up, median of {args.repeats} round(s) run back to back; 1-min load "
              f"average {min(loads):.1f}-{max(loads):.1f} ({os.cpu_count()} means every core busy)")
    versus = "the baseline" if args.engines_only else "open_clip"
    lines = [header, "", "| model | system | layout | global batch | step time (s), median | min-max (s) | "
             f"samples/s | vs {versus} (median of rounds) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['system']} | {r['layout']} | {r['batch']} | {r['step_time_s']:.3f} | "
                     f"{r['spread'][0]:.2f}-{r['spread'][1]:.2f} | {r['samples_per_s']:.1f} | {r['ratio']:.2f}x |")
    write_report(args.out, "\n".join(lines), {"header": header, "rows": rows})


if __name__ == "__main__":
    main()
