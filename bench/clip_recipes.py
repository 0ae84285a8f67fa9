"""CLIP recipes side by side on the synthetic shapes data, through the real entry points.

    python bench/clip_recipes.py                      # every row, then the table
    python bench/clip_recipes.py --rows clip fastclip_v3 --steps 150 --finetune-steps 100
    python bench/clip_recipes.py --table-only         # the table of runs already made

Pre-training rows (examples/pretrain_clip.py, one process, the same steps and batch each): the
tiny CLIP with 2 layers per tower (the teacher has 4: init-from-teacher copies the embeddings, the
first two layers, the final norms and projections, and reports the teacher's last two layers as
unused) trained with the contrastive loss, FastCLIP v1 and v3, v3 with feature distillation from
the teacher, and with init from the teacher too. The teacher is the README
demo's checkpoint (--teacher, default runs/clip_tiny/checkpoints: `torchrun --nproc_per_node=2
examples/pretrain_clip.py --config configs/clip/tiny.yaml tensor_model_parallel_size=2`); every
row reads the teacher's tokenizer.

Fine-tuning rows (examples/finetune_clip.py with configs/clip/finetune/<scenario>.yaml): each
scenario from the same checkpoint, --finetune-steps steps (early stopping on val_loss may end it
sooner). zero_shot evaluates only.

Each row's final_metrics.json gives zero-shot top-1 (held-out colour-shape pairs, chance 1/12)
and retrieval R@1; wall time is the whole command (start-up and evaluation included). Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = ["clip", "fastclip_v1", "fastclip_v3", "fastclip_v3_fd", "fastclip_v3_fd_init"]
FINETUNE = ["zero_shot", "linear_probe", "lora_dual", "lora_vision", "lora_text", "full"]
# The seed's FastCLIP settings (gamma 0.9, rho 11, lr_tau = lr / 4 with step_thresh), with a short
# "epoch" so gamma leaves 1 inside a short run (the seed decays it over 30 epochs).
FASTCLIP = ["model.loss.name=fastclip", "model.loss.gamma=0.9", "model.loss.gamma_schedule=cosine",
            "model.loss.gamma_decay_epochs=5", "model.loss.samples_per_epoch=2560", "model.loss.rho=11.0",
            "model.loss.lr_tau_scheduler=step_thresh", "model.loss.lr_tau=5e-4"]


def pretrain_args(row: str, steps: int, teacher: str, tokenizer: str, out: str) -> list[str]:
    args = ["examples/pretrain_clip.py", "--config", "configs/clip/tiny.yaml", "model.vision.num_layers=2",
            "model.text.num_layers=2",
            f"data.tokenizer.path={tokenizer}", f"trainer.max_steps={steps}", "trainer.val_check_interval=0",
            f"optim.sched.warmup_steps={max(1, steps // 10)}", f"trainer.log_every_n_steps={max(1, steps // 10)}",
            f"trainer.output_dir={out}", "checkpoint.resume=none"]
    if row != "clip":
        args += FASTCLIP + [f"model.loss.version={'v1' if row == 'fastclip_v1' else 'v3'}"]
    if row in ("fastclip_v3_fd", "fastclip_v3_fd_init"):
        args += ["model.distill.mode=feature", "model.distill.weight=0.5", f"model.distill.teacher={teacher}"]
    if row == "fastclip_v3_fd_init":
        args += ["model.distill.init_from_teacher=true"]
    return args


def finetune_args(scenario: str, steps: int, teacher: str, tokenizer: str, out: str) -> list[str]:
    return ["examples/finetune_clip.py", "--config", f"configs/clip/finetune/{scenario}.yaml",
            f"checkpoint.init_from={teacher}", f"data.tokenizer.path={tokenizer}", f"trainer.max_steps={steps}",
            f"optim.sched.warmup_steps={max(1, steps // 10)}", f"trainer.val_check_interval={max(1, steps // 4)}",
            f"trainer.log_every_n_steps={max(1, steps // 10)}", f"trainer.output_dir={out}", "checkpoint.resume=none"]


def run_row(row: str, args: list[str], out: str) -> dict:
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": REPO}
    start = time.time()
    with open(os.path.join(out, "bench.log"), "w") as log:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - start
    record = {"row": row, "command": " ".join(["python", *args]), "returncode": proc.returncode, "wall_s": wall}
    with open(os.path.join(out, "bench_row.json"), "w") as fh:
        json.dump(record, fh, indent=2)
    return record


def table(out_root: str, rows: list[str]) -> str:
    lines = ["| row | steps | zero-shot top-1 | image->text R@1 | text->image R@1 | val loss | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        out = os.path.join(out_root, row)
        try:
            with open(os.path.join(out, "final_metrics.json")) as fh:
                m = json.load(fh)
            with open(os.path.join(out, "bench_row.json")) as fh:
                r = json.load(fh)
        except OSError:
            lines.append(f"| {row} | not run | | | | | |")
            continue
        steps = m.get("step", 0)
        stop = " (early stop)" if m.get("stop_reason") else ""
        lines.append(f"| {row} | {steps}{stop} | {m.get('zero_shot_top1', float('nan')):.3f} | "
                     f"{m.get('image_to_text_R@1', float('nan')):.3f} | {m.get('text_to_image_R@1', float('nan')):.3f} | "
                     f"{m.get('val_loss', float('nan')):.3f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=PRETRAIN + [f"ft_{s}" for s in FINETUNE])
    parser.add_argument("--steps", type=int, default=150, help="steps of every pre-training row")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--teacher", default="runs/clip_tiny/checkpoints")
    parser.add_argument("--tokenizer", default="runs/clip_tiny/tokenizer/spm_bpe_1000.model")
    parser.add_argument("--out", default="runs/recipes")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.table_only:
        for row in args.rows:
            out = os.path.join(args.out, row)
            if row.startswith("ft_"):
                cmd = finetune_args(row[3:], args.finetune_steps, args.teacher, args.tokenizer, out)
            else:
                cmd = pretrain_args(row, args.steps, args.teacher, args.tokenizer, out)
            record = run_row(row, cmd, out)
            print(f"{row}: exit {record['returncode']}, {record['wall_s']:.0f} s", flush=True)
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(table(args.out, args.rows))


if __name__ == "__main__":
    main()
