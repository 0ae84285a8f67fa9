"""`optim.sched.name`: the OneCycle schedule equals torch's OneCycleLR step for step (pct_start =
warmup_steps / max_steps, rel 1e-9), ends at min_lr when one is given, and refuses a warmup that
leaves no rise or no fall; the names are checked when the config loads."""
import pytest
import torch

from engine.config import ConfigError
from engine.optim import WarmupCosineSchedule


class _Recorder:
    def __init__(self):
        self.lrs = []

    def set_lr(self, step, lr):
        self.lrs.append((step, lr))


def _lrs(name, total, warmup, min_lr=0.0, max_lr=1e-3):
    rec = _Recorder()
    sched = WarmupCosineSchedule(rec, max_lr, warmup, total, min_lr, name)
    for _ in range(total - 1):
        sched.step()
    return [lr for _, lr in rec.lrs]


@pytest.mark.parametrize("total,warmup", [(50, 5), (37, 10), (10, 2)])
def test_onecycle_equals_torch(total, warmup):
    max_lr = 1e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total, pct_start=warmup / total)
    want = []
    for _ in range(total):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert _lrs("onecycle", total, warmup) == pytest.approx(want, rel=1e-9)


def test_onecycle_ends_at_min_lr_and_peaks_at_the_end_of_warmup():
    lrs = _lrs("onecycle", 40, 4, min_lr=1e-5)
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-9)
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 3
    assert lrs[0] == pytest.approx(1e-3 / 25)


def test_onecycle_needs_a_rise_and_a_fall():
    with pytest.raises(ConfigError, match="warmup_steps=4"):
        WarmupCosineSchedule(_Recorder(), 1e-3, 0, 40, 0.0, "onecycle")
    with pytest.raises(ConfigError, match="0 < optim.sched.warmup_steps < trainer.max_steps"):
        WarmupCosineSchedule(_Recorder(), 1e-3, 40, 40, 0.0, "onecycle")


def test_resume_restores_the_same_lr():
    rec = _Recorder()
    sched = WarmupCosineSchedule(rec, 1e-3, 5, 30, 0.0, "onecycle")
    for _ in range(12):
        sched.step()
    other = WarmupCosineSchedule(_Recorder(), 1e-3, 5, 30, 0.0, "onecycle")
    other.load_state_dict(sched.state_dict())
    assert other.lr == sched.lr
