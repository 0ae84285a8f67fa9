"""Early stopping and the micro-batch finder (fake probes and a CPU memory budget)."""
import math

import pytest
import torch

from models.common.finetune_utils import (
    EarlyStopping,
    divisors,
    find_micro_batch_size,
    memory_budget_probe,
    saved_activation_bytes,
)


def test_early_stopping_min_patience_two():
    stopper = EarlyStopping(patience=2, min_delta=0.001, mode="min")
    # 1.0 best; 0.9995 is not better by more than 0.001; 0.95 is; then two flat evaluations stop it.
    verdicts = [stopper.step(v) for v in (1.0, 0.9995, 0.95, 0.9495, 0.96)]
    assert verdicts == [False, False, False, False, True]
    assert stopper.best == 0.95 and stopper.stopped


def test_early_stopping_max_nan_and_resume():
    stopper = EarlyStopping(patience=3, min_delta=0.0, mode="max")
    assert [stopper.step(v) for v in (0.5, 0.6, math.nan, 0.6)] == [False, False, False, False]
    assert stopper.bad_evaluations == 2  # NaN and an equal value are not improvements
    resumed = EarlyStopping(patience=3, min_delta=0.0, mode="max")
    resumed.load_state_dict(stopper.state_dict())
    assert resumed.step(0.59) is True and stopper.step(0.59) is True
    assert EarlyStopping(patience=0).step(1.0) is False
    zero = EarlyStopping(patience=0)
    zero.step(1.0)
    assert zero.step(1.0) is True
    with pytest.raises(ValueError, match="mode 'avg'"):
        EarlyStopping(mode="avg")


def test_finder_against_a_budget():
    calls = []

    def fits(b):
        calls.append(b)
        return 100 + 37 * b <= 1000  # the largest that fits is 24

    assert find_micro_batch_size(fits, limit=512) == 24
    assert len(calls) <= 2 * math.ceil(math.log2(512)) + 1  # doubling, then bisection
    assert find_micro_batch_size(fits, candidates=divisors(64)) == 16  # 32 does not fit
    assert find_micro_batch_size(lambda b: True, limit=40) == 40
    assert find_micro_batch_size(lambda b: b <= 7, start=3, limit=8) == 7
    with pytest.raises(RuntimeError, match="not even micro-batch 1"):
        find_micro_batch_size(lambda b: False, limit=8)


def test_finder_with_measured_cpu_memory():
    """Saved activations of Linear(16, 32) -> ReLU -> Linear(32, 8): 4 bytes x (16 + 32) per sample
    on top of the second weight (the first layer's input needs no gradient, so its weight is not kept)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))

    def step(b):
        model(torch.randn(b, 16)).sum().backward()

    measure = saved_activation_bytes(step)
    per_sample, fixed = 4 * (16 + 32), 4 * 32 * 8
    for b in (1, 3, 8):
        assert measure(b) == fixed + per_sample * b
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = params * 2 + fixed + per_sample * 50 + 100  # weights and grads, plus room for 50 samples
    probe = memory_budget_probe(measure, budget, fixed_bytes=params * 2)
    assert find_micro_batch_size(probe, limit=1024) == 50



def test_adamw_8bit_is_optional(monkeypatch):
    import sys
    import types

    from models.common.finetune_utils import adamw_8bit

    params = [torch.nn.Parameter(torch.zeros(2))]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        adamw_8bit(params, lr=1e-4)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    with pytest.raises(RuntimeError, match="CUDA device"):
        adamw_8bit(params, lr=1e-4)


def test_one_cycle_matches_torch():
    from models.common.finetune_utils import one_cycle_lr

    total, max_lr = 50, 1e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total, pct_start=0.1)
    for step in range(total):
        assert one_cycle_lr(step, max_lr, total, pct_start=0.1) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()
