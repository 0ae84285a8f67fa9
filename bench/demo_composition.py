"""Which tiny-CLIP demo settings make zero-shot accuracy on the held-out colour-shape pairs show
composition (shape accuracy well above the 0.5 that colour alone gives), at about the demo's cost.

Each variant is one single-process run (TP=1: the same arithmetic as the demo's TP=2, without
the communication) through the engine's own entry point, on the synthetic shapes data written
for it. Prints one table row per run: steps, samples, wall and CPU seconds, and the zero-shot
metrics at every evaluation. Timings on a shared machine are noisy; compare work (steps x batch)
and CPU seconds as well as wall time.

    PYTHONPATH=. python bench/demo_composition.py --list
    PYTHONPATH=. python bench/demo_composition.py baseline --out /tmp/demo_exp
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import synthetic

# name -> (config overrides, data-module patches). Data patches change what data/synthetic.py
# writes (sizes, captions), so each such variant gets its own data directory. "baseline" is the
# README demo as configs/clip/tiny.yaml has it; the others are the settings it was chosen over
# (results: bench/results/demo_composition_cpu.md).
BASE = ["--config", "configs/clip/tiny.yaml"]
VARIANTS: dict[str, tuple[list[str], dict]] = {
    "baseline": ([], {}),
}


def _add(name: str, overrides: list[str], patches: dict | None = None) -> None:
    VARIANTS[name] = (overrides, patches or {})


# The captions before the demo's change: every one names size or position besides colour and shape.
DETAILED_CAPTIONS = [t for t in synthetic.CAPTION_TEMPLATES if "{size}" in t or "{where}" in t]
STEPS_400 = ["trainer.max_steps=400", "optim.sched.warmup_steps=40"]
PATCH_8 = ["model.vision.patch_dim=8"]
# The demo before: 8-pixel patches, 400 steps, micro-batches of 128 (valid up to DP=1 only with
# accumulation 1), detailed captions only.
PREVIOUS = PATCH_8 + STEPS_400 + ["trainer.micro_batch_size=128"]
_add("previous_demo", PREVIOUS, {"CAPTION_TEMPLATES": DETAILED_CAPTIONS})
_add("previous_demo_large_shapes", PREVIOUS,
     {"CAPTION_TEMPLATES": DETAILED_CAPTIONS, "SIZES": {"small": 0.4, "large": 0.7}})
_add("previous_demo_mb32", PATCH_8 + STEPS_400, {"CAPTION_TEMPLATES": DETAILED_CAPTIONS})
_add("patch8", PATCH_8 + STEPS_400)  # object captions, 8-pixel patches, 400 steps
_add("steps400", STEPS_400)  # the demo with half the steps: the learning rate decays too early
_add("detailed_captions", [], {"CAPTION_TEMPLATES": DETAILED_CAPTIONS})
_add("lr1e-3", ["optim.lr=0.001"])


class _EvalCapture(logging.Handler):
    """Keeps the engine's 'eval at step N | key value | ...' lines as dicts."""

    def __init__(self):
        super().__init__()
        self.evals: list[dict] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("eval at step"):
            step = int(re.match(r"eval at step (\d+)", msg).group(1))
            metrics = dict(re.findall(r"\| (\S+) ([-0-9.]+)", msg))
            self.evals.append({"step": step, **{k: float(v) for k, v in metrics.items()}})


def _features(model, tokenizer, shards: list[str], image_size: int, context_length: int):
    import torch

    from data.pipeline import build_clip_dataloader
    from data.transforms import build_image_transform

    loader = build_clip_dataloader(shards, dp_rank=0, dp_size=1, batch_size=250, tokenizer=tokenizer,
                                   image_transform=build_image_transform(image_size, train=False),
                                   context_length=context_length, shuffle_buffer=0, infinite=False)
    feats, labels = [], []
    with torch.no_grad():
        for batch in loader:
            feats.append(model.encode_image(batch["images"]))
            labels.append(batch["class_index"])
    return torch.cat(feats), torch.cat(labels)


def diagnose(model, tokenizer, cfg, out_root: str, data_key: str) -> dict:
    """Zero-shot over all 36 colour-shape pairs on fresh images of the held-out pairs and of the
    training pairs: is shape learnt at all on the pairs seen in training (then the held-out gap is
    composition), and where do held-out images go (a seen pair of the same colour?)."""
    import torch

    from engine.evaluation import class_embeddings

    pairs = [(c, s) for c in synthetic.COLORS for s in synthetic.SHAPES]
    index = {p: i for i, p in enumerate(pairs)}
    held = set(synthetic.held_out_pairs())
    size = cfg.data.synthetic.image_size
    diag_dir = os.path.join(out_root, f"diag_{data_key}_{size}")
    if not os.path.exists(os.path.join(diag_dir, "done")):
        os.makedirs(diag_dir, exist_ok=True)
        synthetic._write_split(diag_dir, "seen", synthetic.train_pairs(), 600, size, 600, 99, index)
        synthetic._write_split(diag_dir, "held", synthetic.held_out_pairs(), 600, size, 600, 99, index)
        open(os.path.join(diag_dir, "done"), "w").close()
    ctx_len = cfg.model.text.encoder_seq_length
    model.eval()
    with torch.no_grad():
        embeds = class_embeddings(model.encode_text, lambda t: tokenizer(t, context_length=ctx_len),
                                  [synthetic.class_name(c, s) for c, s in pairs], synthetic.PROMPT_TEMPLATES)
    out = {}
    for split in ("seen", "held"):
        feats, labels = _features(model, tokenizer, [os.path.join(diag_dir, f"{split}-000000.tar")],
                                  cfg.model.vision.img_h, ctx_len)
        logits = feats @ embeds.T
        for name, allowed in (("own", [p in held if split == "held" else p not in held for p in pairs]),
                              ("all36", [True] * len(pairs))):
            masked = logits.masked_fill(~torch.tensor(allowed), float("-inf"))
            pred = masked.argmax(1).tolist()
            truth = labels.tolist()
            n = len(truth)
            out[f"{split}_{name}_top1"] = round(sum(p == t for p, t in zip(pred, truth)) / n, 3)
            out[f"{split}_{name}_color"] = round(sum(pairs[p][0] == pairs[t][0] for p, t in zip(pred, truth)) / n, 3)
            out[f"{split}_{name}_shape"] = round(sum(pairs[p][1] == pairs[t][1] for p, t in zip(pred, truth)) / n, 3)
            if split == "held" and name == "all36":
                out["held_all36_pred_seen_pair"] = round(sum(pairs[p] not in held for p in pred) / n, 3)
    model.train()
    return out


def run_variant(name: str, out_root: str, extra: list[str], diag: bool) -> dict:
    overrides, patches = VARIANTS[name]
    for attr, value in patches.items():
        setattr(synthetic, attr, value)
    data_key = "default" if not patches else hashlib.sha1(json.dumps(patches, sort_keys=True).encode()).hexdigest()[:8]
    out_dir = os.path.join(out_root, name)
    argv = BASE + [f"trainer.output_dir={out_dir}", f"data.synthetic.out_dir={out_root}/data_{data_key}",
                   "checkpoint.save_at_end=false", "checkpoint.resume=none", "trainer.val_check_interval=100",
                   "device=cpu", *overrides, *extra]
    capture = _EvalCapture()
    logging.getLogger("engine").addHandler(capture)
    from data.tokenizers import build_tokenizer
    from engine.family import get_family
    from engine.run import build_trainer, check_before_launch, load_experiment
    from parallel.context import destroy_parallel, initialize_parallel

    family = get_family("clip")
    cfg = load_experiment(family, argv)
    check_before_launch(cfg, family, 1, argv)
    start_wall, start_cpu = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    ctx = initialize_parallel(1, 1, "cpu", seed=cfg.trainer.seed, environ={})
    trainer = build_trainer(cfg, ctx, family)
    final = trainer.fit()
    end_cpu = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.time() - start_wall
    row = {"variant": name, "overrides": overrides + extra, "patches": patches, "steps": trainer.state.step,
           "samples": trainer.state.samples_seen, "wall_s": round(wall, 1),
           "cpu_s": round(end_cpu.ru_utime + end_cpu.ru_stime - start_cpu.ru_utime - start_cpu.ru_stime, 1),
           "loss": trainer.state.history[-5:], "evals": capture.evals,
           "final": {k: final.get(k) for k in ("zero_shot_top1", "zero_shot_color_acc", "zero_shot_shape_acc",
                                                "zero_shot_chance")}}
    if diag:
        tok = build_tokenizer(cfg.data.tokenizer.type, cfg.data.tokenizer.path, vocab_size=cfg.data.tokenizer.vocab_size,
                              cache_dir=os.path.join(cfg.trainer.output_dir, "tokenizer"))
        row["diagnosis"] = diagnose(trainer.parts.model, tok, cfg, out_root, data_key)
    destroy_parallel()
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", nargs="?")
    parser.add_argument("--out", default="/tmp/demo_composition")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-diagnosis", action="store_true", help="skip the 36-pair diagnostic evaluation")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides")
    args = parser.parse_intermixed_args(argv)
    if args.list or not args.variant:
        for name, (overrides, patches) in VARIANTS.items():
            print(f"{name:24s} {' '.join(overrides)} {patches or ''}")
        return
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    row = run_variant(args.variant, args.out, args.overrides, not args.no_diagnosis)
    with open(os.path.join(args.out, "results.jsonl"), "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print("| variant | steps | samples | wall s | cpu s | top1 | colour | shape |")
    f = row["final"]
    print(f"| {row['variant']} | {row['steps']} | {row['samples']} | {row['wall_s']} | {row['cpu_s']} | "
          f"{f['zero_shot_top1']:.3f} | {f['zero_shot_color_acc']:.3f} | {f['zero_shot_shape_acc']:.3f} |")
    if "diagnosis" in row:
        print(json.dumps(row["diagnosis"]))


if __name__ == "__main__":
    main()
