"""The step loop's fault paths on one process (tests/unit/tiny_trainer.py): what a resume logs about
the optimizer, a failing evaluation that must not cost the final checkpoint, and a diverged run
whose non-finite states must not become `latest`."""
import logging

from engine.checkpoint.storage import step_dirname
from tests.unit.tiny_trainer import tiny_config, tiny_trainer


def _run(cfg, ctx, **kwargs):
    trainer, data = tiny_trainer(cfg, ctx, **kwargs)
    try:
        trainer.fit(data)
    finally:
        trainer.checkpoint.close()
    return trainer


def test_resume_logs_what_happens_to_the_optimizer_state(single_rank, tmp_path, caplog):
    cfg = tiny_config(str(tmp_path), max_steps=2, save_interval=0)
    _run(cfg, single_rank)
    cfg.trainer.max_steps = 3
    with caplog.at_level(logging.INFO, logger="engine"):
        resumed = _run(cfg, single_rank)
    assert resumed.checkpoint.loaded_from.endswith(step_dirname(2))
    assert "optimizer state starts fresh" not in caplog.text  # a normal resume loads the Adam moments
    caplog.clear()
    cfg.trainer.max_steps, cfg.checkpoint.load_optimizer = 4, False
    with caplog.at_level(logging.INFO, logger="engine"):
        _run(cfg, single_rank)
    assert "checkpoint.load_optimizer=false: optimizer state starts fresh" in caplog.text
