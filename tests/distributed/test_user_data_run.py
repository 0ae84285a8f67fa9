"""A user's own data end to end, with the README's commands: an ImageFolder tree -> `python -m
data.image_folder` -> `python -m data.train_tokenizer` -> a 2-rank DP=2 run of the entry point on
those shards, one of them corrupted on purpose. Zero-shot metrics come out, and the data totals
count exactly what was read and what was skipped."""
import importlib.util
import json
import os
import subprocess
import sys

from tests.distributed.harness import run_ranks
from tests.unit.test_image_folder import CLASSES, make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PER_CLASS, PER_SHARD, STEPS, MICRO = 10, 6, 4, 4  # 3 classes x 10 images: 6 eval, 24 train in 4 shards


def _cli(*args):
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr
    return result


def _train(argv: list):
    spec = importlib.util.spec_from_file_location("pretrain_clip", "examples/pretrain_clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_image_folder_shards_train_with_zero_shot_and_counted_skips(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=PER_CLASS, size=(36, 32))
    (root / "green_cross" / "broken.jpg").unlink()  # 30 readable images: the split below is exact
    shards = tmp_path / "shards"
    _cli("data.image_folder", str(root), "--out", str(shards), "--eval-fraction", "0.2", "--samples-per-shard",
         str(PER_SHARD), "--image-size", "32")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["train"]] == [PER_SHARD] * 4 and manifest["num_samples"]["eval"] == 6
    # train-000003.tar is rank 1's second shard (shards go round-robin over DP ranks): make it unreadable
    (shards / "train-000003.tar").write_bytes(b"this is not a tar file\n" * 64)
    train_spec = f"{shards}/train-{{000000..000003}}.tar"
    tokenizer = tmp_path / "tokenizer" / "spm.model"
    made = _cli("data.train_tokenizer", train_spec, "--out", str(tokenizer), "--vocab-size", "64")
    assert "skipped unreadable shard" in made.stderr and "train-000003.tar" in made.stderr

    out = tmp_path / "run"
    argv = [
        "--config", "configs/clip/tiny.yaml", "device=cpu", f"trainer.output_dir={out}",
        f"data.train_shards={train_spec}", f"data.eval_shards={shards}/eval-000000.tar",
        f"data.classes_file={shards}/classes.json", f"data.tokenizer.path={tokenizer}", "data.shuffle_buffer=0",
        "model.vision.img_h=32", "model.vision.img_w=32", "model.vision.patch_dim=8",
        "model.vision.num_layers=2", "model.text.num_layers=2", "model.vision.hidden_size=64",
        "model.text.hidden_size=64", "model.vision.ffn_hidden_size=128", "model.text.ffn_hidden_size=128",
        "model.text.encoder_seq_length=16", f"trainer.max_steps={STEPS}", f"trainer.micro_batch_size={MICRO}",
        f"trainer.global_batch_size={2 * MICRO}", "trainer.log_every_n_steps=2", "trainer.val_check_interval=0",
        # two eval batches, one per DP rank (a rank without an eval batch is mended on the hardening branch)
        "eval.batch_size=3", "checkpoint.save_at_end=false",
    ]
    results = run_ranks(2, _train, argv, timeout=400)
    assert results[0] == results[1]  # evaluation gathers features over DP: one answer
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["zero_shot_chance"] == 1 / len(CLASSES)
    assert 0 <= final["zero_shot_top1"] <= 1 and "zero_shot_top5" not in final  # 3 classes: no top-5
    assert final["zero_shot_top1"] == results[0]["zero_shot_top1"] and "image_to_text_R@1" in final
    # Without a shuffle buffer each rank reads its shards in order. Rank 0 (train-000000, -000002)
    # never fails; rank 1 reads train-000001 (6 samples), fails on train-000003, and starts the next
    # epoch: its STEPS x MICRO = 16 samples take 3 passes over train-000001, so 2 failed shard reads.
    needed = STEPS * MICRO
    assert final["data_samples_read"] == 2 * needed == final["samples_seen"]
    assert final["data_samples_skipped"] == 0
    assert final["data_shard_reads_skipped"] == (needed - 1) // PER_SHARD == 2
