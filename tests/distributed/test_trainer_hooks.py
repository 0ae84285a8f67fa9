"""The engine's family hooks, on a family the engine has never heard of (the toy regression family):
`TrainingParts.after_step(step, skipped)` runs after every optimizer and LR-schedule step on every
rank, with the number of steps done; `stop_requested()` asked by one rank only stops every rank at
the same step (agreed over all ranks, so none is left in a collective), after a checkpoint
(reason "stop"), and the run ends normally with the reason in the log and final_metrics.json.
DP=2, two gloo ranks; only rank 1 asks to stop, at step 3 of 6.
"""
import json

from tests.distributed.harness import run_ranks

ARGS = ["device=cpu", "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=0", "optim.sched.name=constant", "optim.sched.warmup_steps=0", "optim.lr=1e-2",
        "trainer.max_steps=6"]


def _run(argv: list[str]):
    import dataclasses

    import torch.distributed as dist

    import models.registry
    from engine.family import get_family
    from engine.run import run
    from tests.distributed import toy_family

    toy_family.register()
    calls = []

    def build(cfg, ctx, precision):
        parts = toy_family.build(cfg, ctx, precision)
        parts.after_step = lambda step, skipped: calls.append((step, skipped))
        parts.stop_requested = lambda: ("asked by rank 1" if dist.get_rank() == 1 and len(calls) >= 3 else None)
        return parts

    family = dataclasses.replace(get_family("toy"), build=build)
    models.registry.FAMILIES["toy"] = toy_family.REGISTRY_ENTRY
    final = run(family, argv)
    return {"calls": calls, "final": final}


def test_after_step_and_an_agreed_stop(tmp_path):
    from engine.checkpoint.reader import CheckpointReader

    out = tmp_path / "run"
    results = run_ranks(2, _run, ARGS + [f"trainer.output_dir={out}"])
    for result in results:  # both ranks, though only rank 1 asked
        assert result["calls"] == [(1, False), (2, False), (3, False)]
    summary = json.loads((out / "final_metrics.json").read_text())
    assert summary["step"] == 3 and summary["stop_reason"] == "asked by rank 1"
    reader = CheckpointReader(str(out / "checkpoints"))
    assert reader.meta["step"] == 3 and reader.meta["reason"] == "stop"
