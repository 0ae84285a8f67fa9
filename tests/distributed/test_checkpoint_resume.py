"""Exact resume: STEPS steps straight equal STOP_AT steps, a preemption (SIGUSR1 -> agreed stop,
save, exit), a new process group resuming from `latest`, and the remaining steps -- bit-identical
losses and parameters on CPU, at TP=2 x DP=2 in fp32 with ZeRO-1 and with the replicated AdamW, and
at DP=2 in bf16 O2 with ZeRO-1 (fp32 master weights in the checkpoint).

The run has dropout (the RNG streams must be restored), a shuffle buffer that is full at the stop
and an epoch boundary after the stop (the data position must be restored), gradient accumulation
and a warmup + cosine schedule.
"""
import os

import pytest
import torch

from tests.distributed.test_checkpoint_helpers import STEPS, STOP_AT, recipe_overrides, run_recipe
from tests.distributed.harness import run_ranks


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))


@pytest.mark.parametrize("optimizer,tp,world,extra", [
    ("distributed_fused_adam", 2, 4, []),
    ("adamw", 2, 4, []),
    # bf16 O2: bf16 weights, fp32 master weights sharded over DP (saved as optim/master/*)
    ("distributed_fused_adam", 1, 2, ["trainer.precision=bf16", "model.megatron_amp_O2=true"]),
    # two pipeline stages: only the first reads data; RNG per stage
    ("distributed_fused_adam", 1, 4, ["pipeline_model_parallel_size=2"]),
], ids=["zero1-tp2-dp2", "adamw-tp2-dp2", "zero1-bf16-O2-dp2", "zero1-pp2-dp2"])
def test_exact_resume_after_preemption(tmp_path, shapes_dir, optimizer, tp, world, extra):
    def overrides(out):
        return recipe_overrides(out, shapes_dir, tp, optimizer) + extra

    straight = run_ranks(world, run_recipe, overrides(str(tmp_path / "straight")), timeout=600)
    split_dir = str(tmp_path / "split")
    first = run_ranks(world, run_recipe, overrides(split_dir), STOP_AT, timeout=600)
    assert all(r["preempted"] and r["step"] == STOP_AT for r in first)
    ckpt_root = os.path.join(split_dir, "checkpoints")
    with open(os.path.join(ckpt_root, "latest")) as fh:
        assert fh.read().strip() == f"step_{STOP_AT:09d}"
    second = run_ranks(world, run_recipe, overrides(split_dir), timeout=600)
    assert second[0]["loaded_from"].endswith(f"step_{STOP_AT:09d}")
    assert second[0]["step"] == STEPS and not second[0]["preempted"]

    want, got = straight[0], second[0]
    assert len(want["history"]) == STEPS
    assert got["history"] == want["history"]  # every step's loss, bit for bit
    assert got["samples_seen"] == want["samples_seen"]
    for rank, (want_rank, got_rank) in enumerate(zip(straight, second)):  # every stage's and TP rank's share
        for name, tensor in want_rank["params"].items():
            assert torch.equal(got_rank["params"][name], tensor), (rank, name)
    # the final save of the resumed run is the latest; the preemption checkpoint is kept (keep_last=3)
    with open(os.path.join(ckpt_root, "latest")) as fh:
        assert fh.read().strip() == f"step_{STEPS:09d}"
    assert sorted(n for n in os.listdir(ckpt_root) if n.startswith("step_")) == [
        f"step_{STOP_AT:09d}", f"step_{STEPS:09d}"]
