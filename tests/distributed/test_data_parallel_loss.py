"""DP contrastive loss against the single-process loss on the concatenated batch (fp32).

Tolerance 1e-5 absolute and relative: the DP runs reorder float sums (all-gather, all-reduce), the
math is otherwise the same.
"""
import pytest
import torch

from tests.distributed.clip_fixtures import tiny_batch, tiny_clip_config
from tests.distributed.harness import run_ranks

TOL = 1e-5
GLOBAL_BATCH = 8


def _run(tp: int, local_loss: bool, gather_with_grad: bool, full_state: dict | None):
    from models.clip.loss import ContrastiveLoss
    from models.clip.model import CLIPModel
    from parallel.context import initialize_parallel
    from parallel.data_parallel import GradientAverager
    from parallel.tp_sharding import gather_full_grads, gather_full_state_dict, shard_full_state_dict

    ctx = initialize_parallel(tp, 1, device="cpu", seed=11)
    cfg = tiny_clip_config()
    model = CLIPModel(cfg)
    if full_state is not None:
        model.load_state_dict(shard_full_state_dict(full_state, model, ctx.tp_rank, tp))
    images, tokens = tiny_batch(GLOBAL_BATCH, seed=5, cfg=cfg)
    dp, rank = ctx.dims.dp, ctx.dp_rank
    local = slice(rank * GLOBAL_BATCH // dp, (rank + 1) * GLOBAL_BATCH // dp)
    loss_fn = ContrastiveLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, group=ctx.dp_group)
    loss = loss_fn(*model(images[local], tokens[local]))
    loss.backward()
    GradientAverager(model.parameters(), ctx.dp_group).average()
    return {"loss": loss.detach(), "grads": gather_full_grads(model, ctx.tp_group),
            "state": gather_full_state_dict(model, ctx.tp_group)}


@pytest.fixture(scope="module")
def reference():
    return run_ranks(1, _run, 1, False, True, None)[0]


def _assert_grads(got: dict, want: dict, scale: float = 1.0, full_scale_names=()):
    assert got.keys() == want.keys()
    for name, grad in want.items():
        expected = grad if name in full_scale_names else grad * scale
        # Vocab padding may differ with TP: compare the rows both layouts hold.
        value = got[name][: grad.shape[0]] if "token_embedding" in name else got[name]
        torch.testing.assert_close(value, expected, atol=TOL, rtol=TOL,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("local_loss", [False, True])
def test_dp2_matches_global_batch(reference, local_loss):
    results = run_ranks(2, _run, 1, local_loss, True, reference["state"])
    losses = torch.stack([r["loss"] for r in results])
    # Without local_loss every rank computes the full global loss; with it, the ranks' losses
    # differ (each covers its own rows) and their mean is the global loss.
    torch.testing.assert_close(losses.mean(), reference["loss"], atol=TOL, rtol=TOL)
    if not local_loss:
        torch.testing.assert_close(losses, reference["loss"].expand(2), atol=TOL, rtol=TOL)
    else:
        assert (losses[0] - losses[1]).abs() > 1e-4
    for r in results:
        _assert_grads(r["grads"], reference["grads"])


def test_gather_without_grad_scales_gradient_by_dp(reference):
    """open_clip's gather_with_grad=False, local_loss=False: each rank holds dL/d(own features)
    only, so after DP averaging the gradient is the global one divided by the DP size. The
    temperature is the exception: every rank sees all logits, so it gets the full gradient."""
    results = run_ranks(2, _run, 1, False, False, reference["state"])
    for r in results:
        torch.testing.assert_close(r["loss"], reference["loss"], atol=TOL, rtol=TOL)
        _assert_grads(r["grads"], reference["grads"], scale=0.5, full_scale_names=("logit_scale",))


def test_tp2_dp2_matches_global_batch(reference):
    results = run_ranks(4, _run, 2, True, True, reference["state"])
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), reference["loss"],
                               atol=TOL, rtol=TOL)
    for r in results:
        _assert_grads(r["grads"], reference["grads"])
