"""The model alone: this engine's CLIP (megatron-core blocks, TP=1) beside open_clip's CLIP, forward +
backward of the same contrastive loss on the same batch in one process, same dimensions, threads and
fp32. It separates the towers' compute from what parallelism adds (the DP all-reduce, the TP
all-reduces), which bench/clip_throughput.py measures together.

    bench/.venv-openclip/bin/python bench/clip_model_step.py --models tiny,b32 --threads 1

Prints a table (median and min of the timed iterations, after two untimed) with the op-level
self-time of matrix multiplies beside it (torch.profiler, 2 iterations), and writes it to
bench/results/clip_model_step_cpu.md (+ .json). Not a test.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from clip_throughput import MODELS, openclip_dims  # noqa: E402
from report import write_report  # noqa: E402

# Per process: the engine at DP=2 gives each rank half the global batch (tiny 64, B/32 8).
BATCH = {"tiny": 64, "b32": 8}


def build_models(model: str):
    import open_clip
    import torch

    from engine.config import load_config
    from models.clip.config import CLIPExperimentConfig
    from models.clip.model import CLIPModel

    path = os.path.join(ROOT, MODELS[model]["config"])
    cfg = load_config(CLIPExperimentConfig, path, ["model.text.vocab_size=49408"])
    torch.manual_seed(0)
    engine = CLIPModel(cfg.model, use_cpu_initialization=True)
    dims = openclip_dims(path)
    reference = open_clip.CLIP(dims["embed_dim"], dims["vision"], dims["text"])
    return cfg.model, engine, reference


def step_fns(model_cfg, engine, reference, batch: int):
    import torch
    import torch.nn.functional as F

    v, t = model_cfg.vision, model_cfg.text
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, v.img_h, v.img_w, generator=gen)
    tokens = torch.randint(1, 49406, (batch, t.encoder_seq_length), generator=gen)
    tokens[:, -1] = 49407  # end of text: the highest id, as CLIP's BPE
    labels = torch.arange(batch)

    def loss(image_features, text_features, scale):
        logits = scale * image_features @ text_features.t()
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

    def engine_step():
        loss(*engine(images, tokens)).backward()
        engine.zero_grad(set_to_none=True)

    def reference_step():
        image_features, text_features, scale = reference(images, tokens)[:3]
        loss(image_features, text_features, scale).backward()
        reference.zero_grad(set_to_none=True)

    return {"engine (megatron-core blocks, TP=1)": engine_step, "open_clip CLIP": reference_step}


def matmul_seconds(fn, iterations: int = 2) -> float:
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(iterations):
            fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm",
                                                                              "aten::bmm")) / 1e6 / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,b32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--out", default=os.path.join(HERE, "results/clip_model_step_cpu"))
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")
    import torch

    from parallel.context import initialize_parallel

    torch.set_num_threads(args.threads)
    initialize_parallel(1, 1, device="cpu", seed=0, environ={})
    rows = []
    for model in args.models.split(","):
        model_cfg, engine, reference = build_models(model)
        fns = step_fns(model_cfg, engine, reference, BATCH[model])
        times = {name: [] for name in fns}
        for fn in fns.values():
            fn(), fn()  # warm-up
        for _ in range(args.iterations):  # interleaved, so both see the same machine load
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        for name, fn in fns.items():
            rows.append({"model": model, "system": name, "batch": BATCH[model],
                         "median_s": statistics.median(times[name]), "min_s": min(times[name]),
                         "matmul_s": matmul_seconds(fn), "load": os.getloadavg()[0]})
            print(rows[-1], flush=True)
    header = (f"CLIP forward + backward, one process, {args.threads} thread(s), fp32, CPU: "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
              f"{args.iterations} timed iterations after 2, interleaved; 1-min load average "
              f"{min(r['load'] for r in rows):.1f}-{max(r['load'] for r in rows):.1f}")
    lines = [header, "", "| model | system | batch | fwd+bwd median (s) | min (s) | matmul self time (s) | "
             "vs open_clip (median) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = next(x for x in rows if x["model"] == r["model"] and x["system"] == "open_clip CLIP")
        lines.append(f"| {r['model']} | {r['system']} | {r['batch']} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
                     f"{r['matmul_s']:.3f} | {ref['median_s'] / r['median_s']:.2f}x |")
    write_report(args.out, "\n".join(lines), {"header": header, "rows": rows})


if __name__ == "__main__":
    main()
