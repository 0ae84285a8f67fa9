"""The trainer's policy for non-finite steps, tested directly: without a loss scaler (fp32, bf16)
it skips and stops after MAX_CONSECUTIVE_SKIPS in a row; with fp16's dynamic scaler it keeps
skipping while the scale backs off and stops only at the scale's floor; each message fits the
precision that runs (no "loss scale" for bf16, "use bf16" only to an fp16 run)."""
import logging

import pytest

from engine.loss_scaler import DynamicLossScaler, LossScalerConfig
from engine.trainer import MAX_CONSECUTIVE_SKIPS
from tests.unit.tiny_trainer import tiny_config, tiny_trainer


def test_without_a_scaler_it_stops_after_the_limit(single_rank, tmp_path, caplog):
    cfg = tiny_config(str(tmp_path), max_steps=40, save_interval=0)
    trainer, _ = tiny_trainer(cfg, single_rank, nan_from_step=3)
    with caplog.at_level(logging.WARNING), pytest.raises(FloatingPointError) as info:
        trainer.fit()
    assert trainer.state.step == 2 + MAX_CONSECUTIVE_SKIPS - 1  # the stopping step is not counted as done
    assert trainer.state.total_skipped == MAX_CONSECUTIVE_SKIPS
    message = str(info.value)
    assert f"{MAX_CONSECUTIVE_SKIPS} consecutive steps with non-finite gradients" in message
    assert "bf16" not in message and "lower optim.lr or check the data" in message
    warnings = [r.getMessage() for r in caplog.records if "non-finite gradients" in r.getMessage()]
    assert len(warnings) == MAX_CONSECUTIVE_SKIPS and not any("loss scale" in w for w in warnings)


def test_a_skip_streak_below_the_limit_is_survived(single_rank, tmp_path):
    cfg = tiny_config(str(tmp_path), max_steps=MAX_CONSECUTIVE_SKIPS + 4, save_interval=0)
    trainer, _ = tiny_trainer(cfg, single_rank, nan_from_step=None)
    bad = set(range(2, 2 + MAX_CONSECUTIVE_SKIPS - 1))  # one fewer than the limit, then finite again
    step_fn = trainer.forward_step

    def forward_step(model, batch, inputs=None):
        loss, info = step_fn(model, batch, inputs)
        return (loss * float("nan") if trainer.state.step + 1 in bad else loss), info

    trainer.forward_step = forward_step
    trainer.fit()
    assert trainer.state.step == cfg.trainer.max_steps
    assert trainer.state.total_skipped == len(bad) and trainer.state.skipped_steps == 0


def test_fp16_scaler_backs_off_and_stops_only_at_its_floor(single_rank, tmp_path, caplog):
    cfg = tiny_config(str(tmp_path), max_steps=40, save_interval=0)
    trainer, _ = tiny_trainer(cfg, single_rank, nan_from_step=1)
    trainer.optimizer.loss_scaler = DynamicLossScaler(LossScalerConfig(initial_scale=8.0, min_scale=1.0,
                                                                       hysteresis=1))
    with caplog.at_level(logging.WARNING), pytest.raises(FloatingPointError) as info:
        trainer.fit()
    # 8 -> 4 -> 2 -> 1: the third skipped step brings the scale to its floor, and training stops.
    assert trainer.state.total_skipped == 3 < MAX_CONSECUTIVE_SKIPS
    assert "at the minimum loss scale" in str(info.value) and "use trainer.precision=bf16" in str(info.value)
    scales = [r.getMessage().rsplit("loss scale now ", 1)[1].rstrip(")") for r in caplog.records
              if "loss scale now" in r.getMessage()]
    assert scales == ["4", "2", "1"]
