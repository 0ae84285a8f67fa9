"""The flow-matching convention and loss against hand computations, and the ODE samplers against
fields whose exact solution is known (Euler first order, Heun second order)."""
import math

import pytest
import torch

from models.dit.flow import FlowPath, NoiseSource, draw_flow_batch, quality, sample_timesteps, velocity_loss
from models.dit.sampling import guided, initial_noise, integrate


def test_interpolation_velocity_and_loss_match_a_hand_computation():
    path = FlowPath(sigma_min=0.1, sigma_max=1.0)
    x1 = torch.tensor([[2.0, -1.0]])
    eps = torch.tensor([[0.5, 3.0]])
    t = torch.tensor([0.25])
    # sigma(0.25) = 1 - 0.9 * 0.25 = 0.775; x_t = 0.775 * eps + 0.25 * x1
    assert torch.allclose(path.interpolate(x1, eps, t), torch.tensor([[0.3875 + 0.5, 2.325 - 0.25]]))
    # u = x1 - 0.9 * eps
    u = path.velocity(x1, eps)
    assert torch.allclose(u, torch.tensor([[2.0 - 0.45, -1.0 - 2.7]]))
    v_pred = torch.tensor([[1.0, -3.0]])
    # mean of (1 - 1.55)^2 and (-3 + 3.7)^2
    assert velocity_loss(v_pred, u).item() == pytest.approx((0.55 ** 2 + 0.7 ** 2) / 2, rel=1e-6)


def test_issue_convention_with_sigma_max_one():
    """x_t = (1 - (1 - sigma_min) t) eps + t x1, target x1 - (1 - sigma_min) eps."""
    path = FlowPath(sigma_min=1e-4, sigma_max=1.0)
    gen = torch.Generator().manual_seed(0)
    x1, eps, t = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen), torch.rand(5, generator=gen)
    expected = (1 - (1 - 1e-4) * t)[:, None] * eps + t[:, None] * x1
    torch.testing.assert_close(path.interpolate(x1, eps, t), expected)
    torch.testing.assert_close(path.velocity(x1, eps), x1 - (1 - 1e-4) * eps)
    # the ends of the path: pure noise at t=0, the data plus sigma_min noise at t=1
    torch.testing.assert_close(path.interpolate(x1, eps, torch.zeros(5)), eps)
    torch.testing.assert_close(path.interpolate(x1, eps, torch.ones(5)), x1 + 1e-4 * eps)


@pytest.mark.parametrize("sigma_max", [1.0, 2.5])
def test_clean_vector_from_the_true_velocity_is_the_target(sigma_max):
    path = FlowPath(sigma_min=1e-3, sigma_max=sigma_max)
    gen = torch.Generator().manual_seed(1)
    x1, eps, t = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen), torch.rand(4, generator=gen)
    x_t = path.interpolate(x1, eps, t)
    torch.testing.assert_close(path.clean_from_velocity(path.velocity(x1, eps), x_t, t), x1, atol=1e-5, rtol=1e-5)


def test_flow_batch_draws_are_reproducible_per_replica_and_count():
    a, b, other = NoiseSource(3, 0), NoiseSource(3, 0), NoiseSource(3, 1)
    x1 = torch.randn(8, 4)
    draws = [draw_flow_batch(x1, FlowPath(), a.generator(), condition_dropout=0.5) for _ in range(2)]
    same = draw_flow_batch(x1, FlowPath(), b.generator(), condition_dropout=0.5)
    assert torch.equal(draws[0].x_t, same.x_t) and not torch.equal(draws[0].x_t, draws[1].x_t)
    assert not torch.equal(draw_flow_batch(x1, FlowPath(), other.generator()).x_t, draws[0].x_t)
    restored = NoiseSource(3, 0)
    restored.load_state_dict(a.state_dict())
    assert restored.draws == 2
    assert set(draws[0].keep_condition.tolist()) <= {0.0, 1.0}


def test_timestep_sampling():
    gen = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20000, "uniform", gen)
    logit = sample_timesteps(20000, "logit_normal", gen, 0.0, 1.0)
    assert 0 <= uniform.min() and uniform.max() <= 1 and abs(uniform.mean() - 0.5) < 0.01
    assert abs(logit.mean() - 0.5) < 0.01 and logit.std() < uniform.std()  # concentrated in the middle
    with pytest.raises(ValueError, match="uniform or logit_normal"):
        sample_timesteps(2, "cosine", gen)


def test_euler_and_heun_on_a_constant_field_are_exact():
    x0 = torch.tensor([[1.0, -2.0]])
    a = torch.tensor([[0.5, 3.0]])
    for method in ("euler", "heun"):
        torch.testing.assert_close(integrate(lambda x, t: a.expand_as(x), x0, 3, method), x0 + a)


def test_field_linear_in_time_heun_exact_euler_off_by_half_a_step():
    """dx/dt = b t from x0: x(1) = x0 + b/2. Euler's left sums give b (N-1)/(2N); Heun is exact."""
    b, x0, n = 4.0, torch.tensor([[1.0]]), 8
    field = lambda x, t: b * t[:, None].expand_as(x)  # noqa: E731
    torch.testing.assert_close(integrate(field, x0, n, "heun"), x0 + b / 2)
    torch.testing.assert_close(integrate(field, x0, n, "euler"), x0 + b * (n - 1) / (2 * n))


def test_heun_is_second_order_euler_first_order():
    """dx/dt = lam x: x(1) = x0 e^lam. Halving the step divides Heun's error by ~4, Euler's by ~2."""
    lam, x0 = -1.3, torch.tensor([[2.0]], dtype=torch.float64)
    exact = x0 * math.exp(lam)
    field = lambda x, t: lam * x  # noqa: E731
    errors = {m: [(integrate(field, x0, n, m) - exact).abs().item() for n in (16, 32, 64)] for m in ("euler", "heun")}
    for coarse, fine in zip(errors["heun"], errors["heun"][1:]):
        assert 3.8 < coarse / fine < 4.2
    for coarse, fine in zip(errors["euler"], errors["euler"][1:]):
        assert 1.9 < coarse / fine < 2.1
    assert errors["heun"][-1] < 1e-4 < errors["euler"][-1]


def test_guidance_and_noise_are_deterministic_per_sample_index():
    cond, uncond = (lambda x, t: torch.ones_like(x)), (lambda x, t: torch.zeros_like(x))
    x = torch.zeros(2, 3)
    torch.testing.assert_close(guided(cond, uncond, 3.0)(x, torch.zeros(2)), torch.full((2, 3), 3.0))
    assert guided(cond, uncond, 1.0) is cond
    # Sample 7's noise does not depend on what else is in the batch.
    torch.testing.assert_close(initial_noise(torch.tensor([7, 9]), 5, seed=1)[0], initial_noise(torch.tensor([7]), 5, 1)[0])
    assert not torch.equal(initial_noise(torch.tensor([7]), 5, 1), initial_noise(torch.tensor([7]), 5, 2))


def test_quality_bands():
    assert [quality(c) for c in (0.9, 0.75, 0.3, -0.1)] == ["excellent", "good", "improving", "needs improvement"]
