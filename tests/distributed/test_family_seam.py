"""The engine runs a family it has never heard of (tests/distributed/toy_family.py) through the one
generic run: config, layout check, parallel init, build, fit, checkpoints, final metrics.

The toy's last pipeline stage reads its targets from the data iterator, as an LLM's does, so an exact
resume must restore the data position on both reading stages (a last stage that restarted its
stream would pair inputs with other targets and the losses would differ), and its extra checkpoint
state (a [DP] tensor, each replica's entry on its own ranks) must come back too. Compared:
4 steps straight against 2 steps, a new process group, then 2 more from the checkpoint, at PP=2 x
DP=2 on 4 gloo ranks: every logged loss and every final weight bit-identical (CPU fp32).
"""
import json
import os

import torch

from tests.distributed.harness import run_ranks

COMMON = ["pipeline_model_parallel_size=2", "device=cpu", "trainer.micro_batch_size=2",
          "trainer.global_batch_size=8", "trainer.log_every_n_steps=1", "trainer.val_check_interval=0",
          "optim.sched.name=constant", "optim.sched.warmup_steps=0", "optim.lr=1e-2", "checkpoint.keep_last=0"]


def _run(argv: list[str]):
    from tests.distributed import toy_family

    toy_family.register()
    from engine.run import run

    return run("toy", argv)


def _read(ckpt_dir: str):
    from engine.checkpoint.reader import CheckpointReader
    from engine.checkpoint.tools import read_model_checkpoint

    cfg, state = read_model_checkpoint(ckpt_dir)
    reader = CheckpointReader(ckpt_dir)
    return cfg, state, reader.meta, reader.read_tensor("extra/samples/count")


def test_unknown_family_runs_pp2_dp2_with_exact_resume(tmp_path, monkeypatch):
    from tests.distributed import toy_family

    straight, split = tmp_path / "straight", tmp_path / "split"
    run_ranks(4, _run, COMMON + ["trainer.max_steps=4", f"trainer.output_dir={straight}"])
    run_ranks(4, _run, COMMON + ["trainer.max_steps=2", f"trainer.output_dir={split}"])
    final = run_ranks(4, _run, COMMON + ["trainer.max_steps=4", f"trainer.output_dir={split}"])

    monkeypatch.setitem(__import__("models.registry").registry.FAMILIES, "toy", toy_family.REGISTRY_ENTRY)
    cfg_a, state_a, meta_a, count_a = _read(str(straight / "checkpoints" / "step_000000004"))
    _, state_b, meta_b, count_b = _read(str(split / "checkpoints" / "step_000000004"))
    assert type(cfg_a).__name__ == "ToyExperimentConfig" and meta_a["family"] == "toy"
    assert [h[1] for h in meta_a["trainer"]["history"]] == [h[1] for h in meta_b["trainer"]["history"]]
    assert len(meta_a["trainer"]["history"]) == 4
    assert state_a.keys() == state_b.keys() and any(".layers.3." in k for k in state_a)
    for key, tensor in state_a.items():
        if torch.is_tensor(tensor):
            assert torch.equal(tensor, state_b[key]), key
    # 4 steps x 8 samples per global batch / 2 replicas = 16 samples counted per replica entry.
    assert count_a.tolist() == count_b.tolist() == [16.0, 16.0]
    assert all(r["samples_counted"] == 32.0 for r in final)  # the resumed run's eval saw the restored counts
    summary = json.loads((split / "final_metrics.json").read_text())
    assert summary["step"] == 4 and summary["toy_counter"] == 32.0
    assert os.path.exists(split / "config.yaml")
