import pytest

from engine.loss_scaler import DynamicLossScaler, LossScalerConfig


def test_backoff_after_hysteresis_and_growth_after_interval():
    s = DynamicLossScaler(LossScalerConfig(initial_scale=1024, growth_interval=3, hysteresis=2))
    s.update(found_inf=True)
    assert s.scale == 1024 and s.skipped_steps == 1  # first overflow uses up hysteresis only
    s.update(found_inf=True)
    assert s.scale == 512  # hysteresis used up: halve
    s.update(found_inf=True)
    assert s.scale == 256  # and keeps halving until a growth refills the hysteresis
    for _ in range(2):
        s.update(found_inf=False)
    assert s.scale == 256
    s.update(found_inf=False)
    assert s.scale == 512 and s.hysteresis_tracker == 2  # interval reached: grow, refill
    s.update(found_inf=True)
    assert s.scale == 512  # refilled hysteresis absorbs one overflow again
    assert s.skipped_steps == 4


def test_min_scale_floor():
    s = DynamicLossScaler(LossScalerConfig(initial_scale=2, min_scale=1, hysteresis=1))
    for _ in range(5):
        s.update(found_inf=True)
    assert s.scale == 1


def test_state_round_trip():
    a = DynamicLossScaler(LossScalerConfig(initial_scale=64, growth_interval=4, hysteresis=3))
    for found in (True, False, False, True, True, True):
        a.update(found)
    b = DynamicLossScaler(LossScalerConfig(initial_scale=64, growth_interval=4, hysteresis=3))
    b.load_state_dict(a.state_dict())
    for found in (False, False, False, False, True):
        a.update(found)
        b.update(found)
        assert a.state_dict() == b.state_dict()


def test_bad_config():
    with pytest.raises(ValueError, match="growth_factor"):
        DynamicLossScaler(LossScalerConfig(growth_factor=1.0))
