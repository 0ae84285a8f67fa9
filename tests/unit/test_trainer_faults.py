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
