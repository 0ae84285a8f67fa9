"""engine/grad_norm.py clip_grad_norm against torch.nn.utils.clip_grad_norm_ on the same gradients
(one rank): the same norm and clipped gradients (tolerance 1e-6), gradients below the threshold left
untouched (not even multiplied by 1.0), a non-finite norm scales nothing."""
import math

import pytest
import torch

from engine.grad_norm import clip_grad_norm


def _params(scale: float, count: int = 3):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(5, 7)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(5, 7, generator=gen) * scale
    return params


@pytest.mark.parametrize("scale", [10.0, 0.01])  # clipped, and already below max_norm
def test_matches_torch_clip_grad_norm(single_rank, scale):
    ours, ref = _params(scale), _params(scale)
    norm = clip_grad_norm(ours, max_norm=1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm=1.0)
    torch.testing.assert_close(norm, ref_norm, atol=1e-6, rtol=1e-6)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-6)
    clipped = math.sqrt(sum(float(p.grad.square().sum()) for p in ours))
    assert (clipped == pytest.approx(1.0, rel=1e-5)) if scale == 10.0 else clipped < 1.0


def test_below_threshold_leaves_gradients_untouched(single_rank):
    params = _params(0.01)
    before = [p.grad.clone() for p in params]
    versions = [p.grad._version for p in params]
    clip_grad_norm(params, max_norm=1.0)
    assert [p.grad._version for p in params] == versions  # no in-place op ran on them
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


def test_non_finite_norm_scales_nothing(single_rank):
    params = _params(1.0)
    params[1].grad[2, 3] = float("nan")
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm(params, max_norm=1.0)
    assert not torch.isfinite(norm)
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad, b, atol=0, rtol=0, equal_nan=True)  # not turned into NaN
