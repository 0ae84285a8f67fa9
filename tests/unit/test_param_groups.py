"""The model owns its optimizer policy (nanoGPT's `configure_optimizers`): a `param_group` hook puts
parameters into groups with their own weight decay and lr rule (FastCLIP's temperature has its own
lr), frozen parameters get no state. Both optimizers, the replicated torch AdamW and the flat one
(O2 / ZeRO-1), must equal torch's AdamW given the same groups by hand (fp32, 1e-6)."""
import pytest
import torch

from engine.optim import DECAY, NO_DECAY, ParamGroup, ReplicatedAdamW, WarmupCosineSchedule
from engine.distributed_optimizer import FlatAdamW
from engine.optim import group_parameters
from engine.schema import OptimConfig

TEMPERATURE = ParamGroup("temperature", weight_decay=False, lr=lambda step, lr: 3.0 * lr if step < 2 else 0.0)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
        self.bias = torch.nn.Parameter(torch.randn(4, generator=gen))
        self.temperature = torch.nn.Parameter(torch.tensor(0.7))
        self.frozen = torch.nn.Parameter(torch.randn(4, 3, generator=gen), requires_grad=False)

    def param_group(self, name, param):
        if name == "temperature":
            return TEMPERATURE
        return NO_DECAY if param.ndim < 2 else DECAY

    def loss(self, x):
        return ((x @ (self.weight + self.frozen).T + self.bias) * self.temperature).pow(2).mean()


def _train(make_optimizer, steps=4):
    model = Tiny()
    opt = make_optimizer(model)
    sched = WarmupCosineSchedule(opt, 0.05, warmup_steps=1, max_steps=steps)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        opt.prepare_backward(last_micro_batch=True)
        model.loss(torch.randn(5, 3, generator=gen)).backward()
        assert not opt.step().skipped
        sched.step()
    return model, opt


def _reference(steps=4):
    """torch's AdamW with the groups and lrs written out by hand."""
    model = Tiny()
    opt = torch.optim.AdamW([{"params": [model.weight], "weight_decay": 0.1},
                             {"params": [model.bias], "weight_decay": 0.0},
                             {"params": [model.temperature], "weight_decay": 0.0}], lr=0.05, betas=(0.9, 0.98), eps=1e-6)
    sched_lr = WarmupCosineSchedule.lr_at
    fake = type("S", (), {"warmup_steps": 1, "max_steps": steps, "max_lr": 0.05, "min_lr": 0.0, "name": "cosine"})()
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        lr = sched_lr(fake, step)
        for group, rule in zip(opt.param_groups, (None, None, TEMPERATURE.lr)):
            group["lr"] = rule(step, lr) if rule else lr
        opt.zero_grad()
        model.loss(torch.randn(5, 3, generator=gen)).backward()
        opt.step()
    return model


CFG = OptimConfig(lr=0.05, weight_decay=0.1, betas=[0.9, 0.98], eps=1e-6)


@pytest.mark.parametrize("kind", ["replicated", "flat"])
def test_groups_with_their_own_lr_match_torch(single_rank, kind):
    if kind == "replicated":
        model, opt = _train(lambda m: ReplicatedAdamW(m, CFG, None, max_grad_norm=0.0))
    else:
        model, opt = _train(lambda m: FlatAdamW(m, None, lr=CFG.lr, betas=CFG.betas, eps=CFG.eps, weight_decay=0.1,
                                                groups=group_parameters(m), shard=False, bucket_size=7))
    ref = _reference()
    for name in ("weight", "bias", "temperature"):
        torch.testing.assert_close(getattr(model, name), getattr(ref, name), atol=1e-6, rtol=1e-6,
                                   msg=lambda m: f"{kind} {name}: {m}")
    assert torch.equal(model.frozen, Tiny().frozen)  # frozen: never stepped
    # The temperature's rule stopped it after step 2: it moved, then stayed.
    assert model.temperature.item() != 0.7


def test_frozen_parameters_hold_no_state(single_rank):
    groups = group_parameters(Tiny())
    assert [g.name for g, _ in groups] == ["decay", "no_decay", "temperature"]
    assert all(name != "frozen" for _, members in groups for name, _ in members)
    model = Tiny()
    flat = FlatAdamW(model, None, lr=0.1, groups=group_parameters(model), shard=False)
    assert flat.state_bytes() == 2 * 4 * (12 + 4 + 1)  # two fp32 moments of the 17 trainable elements


def test_two_settings_for_one_group_name_are_refused():
    class Bad(Tiny):
        def param_group(self, name, param):
            return ParamGroup("all", weight_decay=param.ndim >= 2)

    with pytest.raises(ValueError, match="parameter group 'all' is given two different settings"):
        group_parameters(Bad())
