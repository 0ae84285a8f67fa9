"""The training entry point at PP=2 (with ZeRO-1 and accumulation over 4 micro-batches): trains,
logs the bubble, and evaluates through the pipeline, every stage reporting the same numbers."""
import importlib.util
import json

from tests.distributed.harness import run_ranks

STEPS = 6


def _train(out_dir: str, extra: list):
    spec = importlib.util.spec_from_file_location("pretrain_clip", "examples/pretrain_clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([
        "--config", "configs/clip/tiny.yaml", "pipeline_model_parallel_size=2", "device=cpu",
        f"trainer.output_dir={out_dir}/run", f"data.synthetic.out_dir={out_dir}/shapes",
        "data.synthetic.num_train=400", "data.synthetic.num_eval=100", "data.synthetic.image_size=32",
        "data.synthetic.samples_per_shard=100", "model.vision.img_h=32", "model.vision.img_w=32",
        "model.vision.patch_dim=8", "model.vision.num_layers=2", "model.text.num_layers=2",
        "model.text.encoder_seq_length=24", f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=8",
        "trainer.global_batch_size=32", "trainer.log_every_n_steps=2", "trainer.val_check_interval=0",
        "optim.name=distributed_fused_adam", "data.shuffle_buffer=50", "eval.batch_size=50", *extra,
    ])


def test_pipeline_run_trains_and_evaluates(tmp_path):
    results = run_ranks(2, _train, str(tmp_path), [], timeout=400)
    assert results[0] == results[1]  # evaluation features are broadcast from the last stage
    assert 0.0 <= results[0]["zero_shot_top1"] <= 1.0 and "image_to_text_R@1" in results[0]
    with open(tmp_path / "run" / "final_metrics.json") as fh:
        final = json.load(fh)
    assert final["step"] == STEPS and final["samples_seen"] == STEPS * 32
