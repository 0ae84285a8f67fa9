"""FastCLIP loss in one process against the float64 whole-batch reference (tests/distributed/fastclip_fixtures.py).

Tolerance: 1e-5 relative (2e-5 absolute) on losses, gradients and state; the code under test runs
in fp32 and in the log domain, the reference in fp64 with u itself.
"""
import dataclasses
import math

import pytest
import torch

from models.clip.fastclip import (
    FastCLIPConfig,
    FastCLIPLoss,
    clamp_logit_scale_,
    gamma_at,
    init_logit_scale_,
    resolve_version,
    temperature_lr,
)
from tests.distributed.fastclip_fixtures import (
    ReferenceFastCLIP,
    TinyFeatures,
    dataset,
    double_copy,
    schedule,
)

RTOL, ATOL = 1e-5, 2e-5
DATA_SIZE, GLOBAL_BATCH, STEPS = 12, 8, 4
LR_TAU = 2e-3
VERSIONS = ["v0", "v1", "v2", "v3", "sogclr", "isogclr"]


def make_cfg(version: str, **kw) -> FastCLIPConfig:
    fields = {"data_size": DATA_SIZE, "gamma": 0.6, "gamma_decay_epochs": 3, "rho": 6.5, "lr_tau": LR_TAU, **kw}
    return FastCLIPConfig(version=version, **fields)


def run_ours(cfg, model, x_image, x_text, steps):
    loss_fn = FastCLIPLoss(cfg)
    out = []
    for idx, epoch in steps:
        model.zero_grad(set_to_none=True)
        image, text, scale = model(x_image[idx], x_text[idx])
        loss = loss_fn(image, text, scale, idx, epoch)
        loss.backward()
        out.append((loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}))
    return out, loss_fn


def run_reference(cfg, version, model, x_image, x_text, steps):
    ref = ReferenceFastCLIP(version, DATA_SIZE, cfg)
    ref_model = double_copy(model)
    ref_model.logit_scale.requires_grad_(model.logit_scale.requires_grad)
    return [ref.step(ref_model, x_image, x_text, idx, epoch, lr_tau=LR_TAU) for idx, epoch in steps], ref


def assert_grads(got: dict, want: dict, what: str):
    for name, ref in want.items():
        if ref is None:
            assert got[name] is None or torch.all(got[name] == 0), f"{what}: {name} should get no gradient"
            continue
        torch.testing.assert_close(got[name].double(), ref, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{what} {n}: {m}")


@pytest.mark.parametrize("parity", [False, True])
@pytest.mark.parametrize("version", VERSIONS)
def test_matches_reference(version, parity):
    cfg = make_cfg(version, reference_parity=parity)
    model = TinyFeatures(seed=3)
    init_logit_scale_(model.logit_scale, cfg)
    x_image, x_text = dataset(DATA_SIZE)
    steps = schedule(DATA_SIZE, GLOBAL_BATCH, STEPS, duplicate=True)
    ours, loss_fn = run_ours(cfg, model, x_image, x_text, steps)
    want, ref = run_reference(cfg, version, model, x_image, x_text, steps)
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(ours, want)):
        torch.testing.assert_close(loss.double(), ref_loss, rtol=RTOL, atol=ATOL, msg=lambda m, s=step: f"step {s} loss: {m}")
        assert_grads(grads, ref_grads, f"step {step}")
    state = loss_fn.sample_state.state_dict()["tensors"]
    for name, value in ref.state().items():
        torch.testing.assert_close(state[name].double(), value, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def test_versions_map_to_reference_flags():
    spec = {v: resolve_version(FastCLIPConfig(version=v)) for v in VERSIONS + ["gcl", "rgcl", "rgcl_g"]}
    assert (spec["v0"].temperature_scheme, spec["v0"].learnable_tau, spec["v0"].multiply_tau) == ("global", True, False)
    assert (spec["v1"].learnable_tau, spec["v1"].multiply_tau) == (False, False)
    assert spec["v2"].temperature_scheme == "individual"
    assert (spec["v3"].learnable_tau, spec["v3"].multiply_tau) == (True, True)
    assert spec["sogclr"].gamma_schedule == spec["isogclr"].gamma_schedule == "constant"
    assert spec["gcl"] == dataclasses.replace(spec["v1"], name="v1") and spec["rgcl_g"].name == "v3"
    with pytest.raises(ValueError, match="version='v9'"):
        resolve_version(FastCLIPConfig(version="v9"))
    with pytest.raises(ValueError, match="constant gamma"):
        resolve_version(FastCLIPConfig(version="sogclr", gamma_schedule="cosine"))


def test_tau_gradient_counted_once_and_parity_doubles_it():
    """Fixed: the global tau gets the gradient of half the surrogate (one path); parity: twice that."""
    x_image, x_text = dataset(DATA_SIZE)
    idx = torch.arange(GLOBAL_BATCH)
    grads = {}
    for parity in (False, True):
        cfg = make_cfg("v0", reference_parity=parity)
        model = TinyFeatures(seed=3)
        loss = FastCLIPLoss(cfg)(*model(x_image[idx], x_text[idx]), idx, 0)
        loss.backward()
        grads[parity] = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(grads[True]["logit_scale"], 2 * grads[False]["logit_scale"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[True]["image"], grads[False]["image"])
    # First step (u = g): one path of d/ds mean(g/u) with u fixed = mean over pairs of exp(d) d / (N-1) / u / s.
    model = TinyFeatures(seed=3).double()
    image, text, s = model(x_image[idx].double(), x_text[idx].double())
    sim = image @ text.T
    with torch.no_grad():
        n = len(idx)
        off = ~torch.eye(n, dtype=torch.bool)
        expected = 0.0
        for d in ((sim - sim.diag()[:, None]), (sim.T - sim.diag()[:, None])):
            e = torch.exp(d * s) * off
            u = e.sum(1) / (n - 1)
            expected = expected + ((e * d).sum(1) / (n - 1) / u).mean()
        expected = expected / 2 * s  # d/dlogit_scale = s d/ds
    torch.testing.assert_close(grads[False]["logit_scale"].double(), expected, rtol=1e-5, atol=1e-7)


def test_log_domain_at_smallest_temperature():
    """tau = 0.01: exponents reach s * 2 = 200, exp overflows fp32; the loss and gradients stay finite
    and equal the fp64 reference (where exp(200) is representable)."""
    cfg = make_cfg("v3", temperature=0.01)
    model = TinyFeatures(seed=4, temperature=0.01)
    init_logit_scale_(model.logit_scale, cfg)
    x_image, x_text = dataset(DATA_SIZE, seed=9)
    x_text = -x_image.clone()  # positives far apart: exp(s * (<e, f_j> - <e, f_i>)) as large as it gets
    steps = schedule(DATA_SIZE, GLOBAL_BATCH, 3)
    with torch.no_grad():
        image, text, s = model(x_image[:4], x_text[:4])
        assert float(((image @ text.T) - (image * text).sum(1, keepdim=True)).max() * s) > 89  # > log(fp32 max)
    ours, _ = run_ours(cfg, model, x_image, x_text, steps)
    want, _ = run_reference(cfg, "v3", model, x_image, x_text, steps)
    for (loss, grads), (ref_loss, ref_grads) in zip(ours, want):
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        assert_grads(grads, ref_grads, "tau=0.01")


def test_broken_state_entries_take_g():
    cfg = make_cfg("v1", gamma=0.5)
    x_image, x_text = dataset(DATA_SIZE)
    idx = torch.arange(4)
    model = TinyFeatures(seed=3)
    fresh = FastCLIPLoss(cfg)
    fresh(*model(x_image[idx], x_text[idx]), idx, 5)
    broken = FastCLIPLoss(cfg)
    broken.sample_state.tensors["log_u_image"][:4] = torch.tensor([math.nan, math.inf, -math.inf, -math.inf])
    broken(*model(x_image[idx], x_text[idx]), idx, 5)
    # fresh state (u = 0) and NaN/inf entries all start from g.
    torch.testing.assert_close(broken.sample_state.tensors["log_u_image"], fresh.sample_state.tensors["log_u_image"])


def test_gamma_schedule():
    cfg = FastCLIPConfig(gamma=0.2, gamma_decay_epochs=4)
    got = [gamma_at(e, cfg) for e in range(6)]
    want = [1.0] + [0.2 + 0.8 * (1 + math.cos(math.pi * e / 4)) / 2 for e in (1, 2, 3)] + [0.2, 0.2]
    assert got == pytest.approx(want)
    assert got[2] == pytest.approx(0.6)
    constant = FastCLIPConfig(version="sogclr", gamma=0.2)
    assert [gamma_at(e, constant) for e in range(3)] == [1.0, 0.2, 0.2]


def test_temperature_schedules_and_clamp():
    cfg = FastCLIPConfig(lr_tau_scheduler="step_thresh")
    assert temperature_lr(10, cfg, 3e-4, tau=0.05) == 3e-4
    assert temperature_lr(10, cfg, 3e-4, tau=0.03) == pytest.approx(1e-4)
    cosine = FastCLIPConfig(lr_tau_scheduler="cosine")
    assert temperature_lr(0, cosine, 1.0, 0.07, warmup_steps=4, total_steps=104) == pytest.approx(0.25)
    assert temperature_lr(54, cosine, 1.0, 0.07, warmup_steps=4, total_steps=104) == pytest.approx(0.5)
    assert temperature_lr(104, cosine, 1.0, 0.07, warmup_steps=4, total_steps=104) == pytest.approx(0.0)
    assert temperature_lr(7, FastCLIPConfig(lr_tau_scheduler="const"), 2.0, 0.01) == 2.0
    param = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale_(param, cfg)
    assert float(param.detach()) == pytest.approx(math.log(100))
    param.data.fill_(-1.0)
    clamp_logit_scale_(param, cfg)
    assert float(param.detach()) == 0.0
    init_logit_scale_(param, FastCLIPConfig(version="v1", temperature=0.05))
    assert float(param.detach()) == pytest.approx(math.log(20)) and not param.requires_grad
    init_logit_scale_(param, FastCLIPConfig(version="v3"))
    assert param.requires_grad


def test_bad_index_and_config_errors():
    cfg = make_cfg("v1")
    loss_fn = FastCLIPLoss(cfg)
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(IndexError, match=r"outside \[0, data_size=12\)"):
        loss_fn(image, image, torch.tensor(10.0), torch.tensor([0, 1, 2, 12]), 0)
    with pytest.raises(ValueError, match="data_size"):
        FastCLIPLoss(FastCLIPConfig(version="v1"))
    with pytest.raises(ValueError, match="lr_tau"):
        FastCLIPLoss(FastCLIPConfig(version="v2", data_size=4, lr_tau=-1.0))
