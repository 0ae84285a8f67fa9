"""The step loop's fault paths on one process (tests/unit/tiny_trainer.py): what a resume logs about
the optimizer, a failing evaluation that must not cost the final checkpoint, and a diverged run
whose non-finite states must not become `latest`."""
import logging
import os

import pytest

from engine.checkpoint.storage import read_latest, step_dirname
from tests.unit.tiny_trainer import tiny_config, tiny_trainer


def _run(cfg, ctx, **kwargs):
    """(trainer, what fit returned)."""
    trainer, data = tiny_trainer(cfg, ctx, **kwargs)
    try:
        return trainer, trainer.fit(data)
    finally:
        trainer.checkpoint.close()


def test_resume_logs_what_happens_to_the_optimizer_state(single_rank, tmp_path, caplog):
    cfg = tiny_config(str(tmp_path), max_steps=2, save_interval=0)
    _run(cfg, single_rank)
    cfg.trainer.max_steps = 3
    with caplog.at_level(logging.INFO, logger="engine"):
        resumed, _ = _run(cfg, single_rank)
    assert resumed.checkpoint.loaded_from.endswith(step_dirname(2))
    assert "optimizer state starts fresh" not in caplog.text  # a normal resume loads the Adam moments
    caplog.clear()
    cfg.trainer.max_steps, cfg.checkpoint.load_optimizer = 4, False
    with caplog.at_level(logging.INFO, logger="engine"):
        _run(cfg, single_rank)
    assert "checkpoint.load_optimizer=false: optimizer state starts fresh" in caplog.text


def test_failing_final_evaluation_keeps_the_final_checkpoint(single_rank, tmp_path):
    """The end-of-run save comes before the final evaluation; a rerun resumes at max_steps and
    evaluates again, so the metrics lost to the failure are produced then."""
    cfg = tiny_config(str(tmp_path), max_steps=5, save_interval=2)
    calls = []

    def broken_eval(step):
        calls.append(step)
        raise RuntimeError("injected evaluation failure")

    with pytest.raises(RuntimeError, match="injected evaluation failure"):
        _run(cfg, single_rank, eval_fn=broken_eval)
    assert calls == [5]
    root = os.path.join(str(tmp_path), "checkpoints")
    assert read_latest(root) == os.path.join(root, step_dirname(5))

    rerun, metrics = _run(cfg, single_rank, eval_fn=lambda step: {"evaluated_at": step})
    assert rerun.checkpoint.loaded_from == os.path.join(root, step_dirname(5)) and rerun.state.step == 5
    assert metrics == {"evaluated_at": 5}


@pytest.mark.parametrize("async_save", [False, True])
def test_diverged_run_never_moves_latest_off_the_last_healthy_checkpoint(single_rank, tmp_path, async_save):
    """Loss NaN from step 5: the weights saved at step 4 produced it, so `latest` stays on step 2;
    the saves at 4, 6, ... are kept for inspection (keep-K never removes what `latest` names), and
    the stop after 10 non-finite steps names step 2."""
    cfg = tiny_config(str(tmp_path), max_steps=40, save_interval=2, keep_last=2)
    cfg.checkpoint.async_save = async_save
    root = os.path.join(str(tmp_path), "checkpoints")
    healthy = os.path.join(root, step_dirname(2))
    with pytest.raises(FloatingPointError) as stop:
        _run(cfg, single_rank, nan_from_step=5)
    assert "training stopped at step 14" in str(stop.value)
    assert f"the last healthy checkpoint is {healthy}" in str(stop.value)
    assert read_latest(root) == healthy
    with open(os.path.join(root, "latest")) as fh:
        assert fh.read().strip() == step_dirname(2)
    kept = sorted(n for n in os.listdir(root) if n.startswith("step_"))
    assert kept == [step_dirname(2), step_dirname(10), step_dirname(12)]  # keep_last=2 newest + latest

    # a restart resumes from the healthy checkpoint
    cfg.trainer.max_steps = 3
    resumed, _ = _run(cfg, single_rank)
    assert resumed.checkpoint.loaded_from == healthy and resumed.state.step == 3


def test_a_transient_nan_step_does_not_hold_latest_back(single_rank, tmp_path):
    """A single skipped step (a bad batch) leaves the weights as they were: the save at that step
    becomes latest once the next loss is finite."""
    cfg = tiny_config(str(tmp_path), max_steps=6, save_interval=2)
    trainer, data = tiny_trainer(cfg, single_rank)
    forward = trainer.forward_step

    def one_bad_step(model, batch, inputs=None):
        loss, info = forward(model, batch, inputs)
        return (loss * float("nan") if trainer.state.step + 1 == 4 else loss), info

    trainer.forward_step = one_bad_step
    try:
        trainer.fit(data)
    finally:
        trainer.checkpoint.close()
    assert trainer.state.total_skipped == 1
    root = os.path.join(str(tmp_path), "checkpoints")
    assert read_latest(root) == os.path.join(root, step_dirname(6))
    assert trainer.checkpoint.healthy_path == os.path.join(root, step_dirname(6))
