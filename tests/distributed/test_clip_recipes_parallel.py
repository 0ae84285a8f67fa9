"""The CLIP recipes through the engine (config -> build -> trainer -> checkpoints), on gloo ranks.

1. FastCLIP v3 at DP=2 resumes exactly: 4 steps straight equal 2 steps, a new process group, and 2
   more (every logged loss, every weight and the per-sample state u bit-identical on CPU fp32; an
   epoch boundary inside the run, so the clock must come back too). The DP=2 checkpoint then
   resumes at DP=1: the state u read back equals the saved one bit for bit, and training continues.
2. FastCLIP v3 with feature distillation from a frozen teacher (an engine checkpoint with another
   patch size: init from teacher leaves the patch embedding and positions out) at TP=2 x PP=2
   equals TP=1 x PP=1 with the same micro-batches: losses and u within 1e-5, evaluation within 1e-4.
   The teacher runs on the last stage at TP=2, which reads the batch for it and for the sample
   indices. examples/eval_clip.py at TP=2 on the TP=1 run's checkpoint reports the same metrics.
3. LoRA fine-tuning (lora_dual) at TP=2 equals TP=1 (losses within 1e-5), base weights loaded
   through the key map and left untouched, only adapters and projections changed.
4. The engine's after-step and stop hooks: FastCLIP's learned temperature stays in [tau_min,
   tau_max] (clamped after each step), early stopping on val_loss stops after `patience`
   evaluations without improvement, saves a checkpoint and ends normally.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

from tests.distributed.harness import run_ranks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small(out_dir: str, shapes_dir: str, *extra: str) -> list[str]:
    """A tiny run on the synthetic shapes; `extra` overrides win (the last value of a key counts)."""
    args = [
        "device=cpu", f"trainer.output_dir={out_dir}", f"data.synthetic.out_dir={shapes_dir}",
        "data.synthetic.num_train=256", "data.synthetic.num_eval=32", "data.synthetic.image_size=32",
        "data.synthetic.samples_per_shard=32", "data.shuffle_buffer=32", "data.tokenizer.vocab_size=200",
        "model.vision.img_h=32", "model.vision.img_w=32", "model.vision.patch_dim=8",
        "model.vision.num_layers=2", "model.text.num_layers=2", "model.text.encoder_seq_length=16",
        "model.vision.hidden_size=64", "model.text.hidden_size=64", "model.output_dim=32",
        "model.vision.ffn_hidden_size=128", "model.text.ffn_hidden_size=128",
        "model.vision.num_attention_heads=4", "model.text.num_attention_heads=4",
        "trainer.micro_batch_size=8", "trainer.global_batch_size=16", "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=0", "optim.sched.warmup_steps=1", "optim.lr=2e-3", "eval.batch_size=16",
        *extra,
    ]
    return list({a.split("=", 1)[0]: a for a in args}.values())


FASTCLIP = ["model.loss.name=fastclip", "model.loss.version=v3", "model.loss.samples_per_epoch=32",
            "model.loss.gamma_decay_epochs=3", "model.loss.gamma=0.5", "model.loss.lr_tau=1e-3"]
NO_EVAL = ["eval.zero_shot=false", "eval.retrieval=false"]


def _train(overrides: list[str], probe_resume: bool = False):
    """One rank of a run (engine.run.build_trainer + fit); returns what the tests compare."""
    from engine.config import load_config
    from engine.run import build_trainer
    from engine.schema import BARE_KEYS
    from models.clip.config import CLIPExperimentConfig
    from parallel.context import initialize_parallel
    from parallel.pp_sharding import gather_pipeline_state
    from parallel.tp_sharding import gather_full_state_dict

    cfg = load_config(CLIPExperimentConfig, None, overrides, BARE_KEYS)
    par = cfg.parallel
    ctx = initialize_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.device,
                              seed=cfg.trainer.seed)
    trainer = build_trainer(cfg, ctx, "clip")
    restored = None
    sample_state = trainer.parts.extra_state.get("fastclip")
    if probe_resume:  # the state as the resume leaves it, before any step
        trainer.checkpoint.resume(trainer)
        restored = {k: v.clone() for k, v in sample_state.state.tensors.items()}
    final = trainer.fit()
    trainer.checkpoint.close()
    params = gather_pipeline_state(gather_full_state_dict(trainer.model, ctx.tp_group), trainer.model, ctx.pp_group)
    return {"history": list(trainer.state.history), "step": trainer.state.step, "final": final,
            "params": {k: v for k, v in params.items() if torch.is_tensor(v)},
            "state": {k: v.clone() for k, v in sample_state.state.tensors.items()} if sample_state else None,
            "offset": sample_state.state.offset if sample_state else None, "restored": restored,
            "stopped": getattr(trainer, "stop_reason", None)}


def _saved_state(ckpt: str) -> dict:
    from engine.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(ckpt)
    return {k.split("/")[-1]: reader.read_tensor(k) for k in reader.keys("extra/fastclip/")}


def _full_u(results) -> dict:
    """u over all DP ranks (each holds its block) from the ranks' results, TP/PP duplicates dropped."""
    blocks = {}
    for r in results:
        if r["state"] is not None:
            blocks[r["offset"]] = r["state"]
    names = next(iter(blocks.values())).keys()
    return {n: torch.cat([blocks[o][n] for o in sorted(blocks)]) for n in names}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))


def test_fastclip_exact_resume_at_dp2_and_resume_at_dp1(tmp_path, shapes_dir):
    def args(out, steps, *extra):
        return small(str(out), shapes_dir, *FASTCLIP, *NO_EVAL, f"trainer.max_steps={steps}",
                     "model.vision.hidden_dropout=0.1", "trainer.global_batch_size=32", *extra)

    straight = run_ranks(2, _train, args(tmp_path / "straight", 4))
    run_ranks(2, _train, args(tmp_path / "split", 2))
    resumed = run_ranks(2, _train, args(tmp_path / "split", 4))
    assert len(straight[0]["history"]) == 4 and resumed[0]["history"] == straight[0]["history"]
    for want, got in zip(straight, resumed):
        for name, tensor in want["params"].items():
            assert torch.equal(got["params"][name], tensor), name
        for name, tensor in want["state"].items():
            assert torch.equal(got["state"][name], tensor), name
    u = _full_u(straight)
    assert torch.isfinite(u["log_u_image"]).sum() > 0  # samples seen have a state
    ckpt = os.path.join(tmp_path, "split", "checkpoints")
    assert {k: torch.equal(v, u[k]) for k, v in _saved_state(os.path.join(ckpt, "step_000000004")).items()} == {
        "log_u_image": True, "log_u_text": True}

    # DP=2 -> DP=1: the whole u comes back on one rank, bit for bit, and one more step trains.
    saved = _saved_state(os.path.join(ckpt, "step_000000002"))
    (one,) = run_ranks(1, _train, args(tmp_path / "dp1", 3, f"checkpoint.resume={ckpt}/step_000000002"), True)
    for name, tensor in saved.items():
        assert torch.equal(one["restored"][name], tensor), name
    assert one["step"] == 3 and len(one["history"]) == 3 and math.isfinite(one["history"][-1][1])
    assert one["history"][:2] == straight[0]["history"][:2]  # the saved run's own steps


def _write_teacher(path: str, shapes_dir: str, tmp_path) -> None:
    """A random CLIP with patch 16 (the students use 8) as an engine checkpoint."""
    from engine.checkpoint.tools import single_process_parallel_state, write_model_checkpoint
    from engine.config import load_config
    from engine.schema import BARE_KEYS
    from models.clip.config import CLIPExperimentConfig
    from models.clip.family import reference_model

    cfg = load_config(CLIPExperimentConfig, None, small(str(tmp_path / "teacher_run"), shapes_dir,
                                                        "model.vision.patch_dim=16"), BARE_KEYS)
    with single_process_parallel_state():
        torch.manual_seed(5)
        state = dict(reference_model(cfg.model).state_dict())
    write_model_checkpoint(path, cfg, state)


def _eval_tool(argv):
    spec = importlib.util.spec_from_file_location("eval_clip", os.path.join(REPO, "examples", "eval_clip.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_fastclip_with_distillation_tp2_pp2_equals_one_process(tmp_path, shapes_dir):
    teacher = str(tmp_path / "teacher")
    _write_teacher(teacher, shapes_dir, tmp_path)
    distill = ["model.distill.mode=feature", "model.distill.weight=0.5", "model.distill.init_from_teacher=true",
               f"model.distill.teacher={teacher}", "trainer.max_steps=3"]

    def args(out, *layout):
        return small(str(out), shapes_dir, *FASTCLIP, *distill, *layout)

    (one,) = run_ranks(1, _train, args(tmp_path / "tp1"))
    four = run_ranks(4, _train, args(tmp_path / "tp2pp2", "tensor_model_parallel_size=2",
                                     "pipeline_model_parallel_size=2"))
    want = [loss for _, loss in one["history"]]
    got = [loss for _, loss in four[0]["history"]]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    u_one, u_four = one["state"], _full_u(four)
    for name in u_one:
        torch.testing.assert_close(u_four[name], u_one[name], atol=1e-5, rtol=1e-5)
    for name, tensor in one["params"].items():
        torch.testing.assert_close(four[0]["params"][name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    for key in ("zero_shot_top1", "image_to_text_R@1", "text_to_image_R@5", "val_loss"):
        assert four[0]["final"][key] == pytest.approx(one["final"][key], abs=1e-4), key

    # The evaluation tool at TP=2 on the one-process run's checkpoint: the run's own final numbers.
    ckpt = str(tmp_path / "tp1" / "checkpoints")
    tool = run_ranks(2, _eval_tool, ["--checkpoint", ckpt, "tensor_model_parallel_size=2",
                                     "--out", str(tmp_path / "eval.json")])
    for key in ("zero_shot_top1", "image_to_text_R@1", "text_to_image_R@1"):
        assert tool[0][key] == pytest.approx(one["final"][key], abs=1e-4), key
    assert "image_to_text_R@10" in tool[0] and "linear_probe_top1" in tool[0]
    assert json.loads((tmp_path / "eval.json").read_text())["layout"]["tensor_model_parallel_size"] == 2


def test_lora_finetuning_tp2_equals_tp1_and_keeps_the_base(tmp_path, shapes_dir):
    from engine.checkpoint.tools import read_model_checkpoint

    base = str(tmp_path / "base")
    _write_teacher(base, shapes_dir, tmp_path)  # any engine checkpoint will do as the pre-trained model

    def args(out, *layout):
        return small(str(out), shapes_dir, "model.vision.patch_dim=16", "model.finetune.scenario=lora_dual",
                     "model.finetune.lora.rank=4", "model.finetune.lora.dropout=0.0", f"checkpoint.init_from={base}",
                     "trainer.max_steps=2", "optim.lr=1e-2", *NO_EVAL, *layout)

    (one,) = run_ranks(1, _train, args(tmp_path / "tp1"))
    two = run_ranks(2, _train, args(tmp_path / "tp2", "tensor_model_parallel_size=2"))
    assert [x for _, x in two[0]["history"]] == pytest.approx([x for _, x in one["history"]], rel=1e-5, abs=1e-6)
    _, base_state = read_model_checkpoint(base)
    _, tuned = read_model_checkpoint(str(tmp_path / "tp2" / "checkpoints"))
    changed = sorted(k for k, v in tuned.items() if torch.is_tensor(v) and (
        k not in base_state or not torch.equal(v, base_state[k])))
    assert any(".lora." in k for k in changed)
    assert {k for k in changed if ".lora." not in k} == {"visual.proj.weight", "text.text_projection.weight"}


def test_temperature_clamp_and_early_stopping(tmp_path, shapes_dir):
    from engine.checkpoint.reader import CheckpointReader

    out = tmp_path / "run"
    # tau may only move in [0.05, 0.06]; a large lr_tau pushes it against a bound. Early stopping
    # with min_delta=100 counts every evaluation after the first as no improvement: with patience 2
    # the third evaluation (step 3 of 6) stops the run.
    argv = small(str(out), shapes_dir, *FASTCLIP[:-1], "model.loss.lr_tau=5.0", "model.loss.temperature=0.055",
                 "model.loss.tau_min=0.05", "model.loss.tau_max=0.06", "model.loss.lr_tau_scheduler=const",
                 "trainer.max_steps=6", "trainer.val_check_interval=1", "eval.early_stopping.monitor=val_loss",
                 "eval.early_stopping.min_delta=100", "eval.early_stopping.patience=2")
    (result,) = run_ranks(1, _train, argv)
    assert result["step"] == 3 and result["stopped"].startswith("early stopping: val_loss")
    reader = CheckpointReader(str(out / "checkpoints"))
    assert reader.meta["step"] == 3 and reader.meta["reason"] == "stop"
    scale = float(reader.read_tensor("model/logit_scale"))
    assert math.log(1 / 0.06) - 1e-6 <= scale <= math.log(1 / 0.05) + 1e-6
    assert abs(scale - math.log(1 / 0.055)) > 1e-3  # it did move, and was held at a bound
    assert reader.read_object("extra/early_stopping/bad_evaluations") == 2
