"""ZeRO-1 (`distributed_fused_adam`) against torch's AdamW on one process, same weights and data.

Tolerance 2e-5 absolute on the parameters after STEPS steps: the runs differ only in the order of
float sums (reduce-scatter vs one process), which Adam's normalised update can amplify for weights
whose gradients are near zero; observed differences are ~1e-6.
"""
import pytest
import torch

from tests.distributed.clip_fixtures import tiny_batch, tiny_clip_config
from tests.distributed.harness import run_ranks

STEPS = 4
GLOBAL_BATCH = 8
TOL = 2e-5


def _train(tp: int, optimizer_name: str, full_state: dict | None, inject_inf_rank: int | None = None,
           bucket_size: int = 40_000_000, overlap: bool = True, shared_memory: bool = True):
    from engine.loss_scaler import DynamicLossScaler, LossScalerConfig
    from engine.optim import build_optimizer
    from engine.schema import OptimConfig
    from models.clip.loss import ContrastiveLoss
    from models.clip.model import CLIPModel
    from parallel.context import initialize_parallel
    from parallel.tp_sharding import gather_full_state_dict, shard_full_state_dict

    ctx = initialize_parallel(tp, 1, device="cpu", seed=3, host_shared_memory=shared_memory)
    cfg = tiny_clip_config()
    model = CLIPModel(cfg)
    if full_state is not None:
        model.load_state_dict(shard_full_state_dict(full_state, model, ctx.tp_rank, tp))
    initial = gather_full_state_dict(model, ctx.tp_group)
    optim_cfg = OptimConfig(name=optimizer_name, lr=1e-3, weight_decay=0.1, betas=[0.9, 0.98], eps=1e-6,
                            bucket_size=bucket_size, overlap_grad_sync=overlap)
    scaler = DynamicLossScaler(LossScalerConfig(initial_scale=1024, hysteresis=2)) if inject_inf_rank is not None else None
    opt = build_optimizer(model, optim_cfg, dp_group=ctx.dp_group, model_parallel_group=ctx.model_parallel_group,
                          max_grad_norm=1.0, loss_scaler=scaler)
    loss_fn = ContrastiveLoss(local_loss=True, gather_with_grad=True, group=ctx.dp_group)
    dp, rank = ctx.dims.dp, ctx.dp_rank
    local = slice(rank * GLOBAL_BATCH // dp, (rank + 1) * GLOBAL_BATCH // dp)
    norms, skipped, scales = [], [], []
    for step in range(STEPS):
        images, tokens = tiny_batch(GLOBAL_BATCH, seed=100 + step, cfg=cfg)
        opt.zero_grad()
        opt.prepare_backward(last_micro_batch=True)
        loss = loss_fn(*model(images[local], tokens[local]))
        handle = None
        if inject_inf_rank is not None and step < 2 and ctx.rank == inject_inf_rank:
            # An overflow in one element on one rank, during backward: after the reduce-scatter only
            # the rank owning that element sees it, so the others must learn it from the agreed flag.
            handle = model.logit_scale.register_hook(lambda g: torch.full_like(g, float("inf")))
        (loss * opt.loss_scale).backward()
        if handle is not None:
            handle.remove()
        result = opt.step()
        norms.append(result.grad_norm)
        skipped.append(result.skipped)
        scales.append(opt.loss_scale)
    return {"state": gather_full_state_dict(model, ctx.tp_group), "initial": initial, "norms": norms,
            "skipped": skipped, "scales": scales, "state_bytes": opt.state_bytes(),
            "buckets": len(getattr(opt, "buckets", [])), "shm": getattr(opt, "_shm", None) is not None}


@pytest.fixture(scope="module")
def reference():
    return run_ranks(1, _train, 1, "adamw", None)[0]


def _assert_params(got: dict, want: dict):
    for name, tensor in want.items():
        if not torch.is_tensor(tensor):
            continue
        value = got[name][: tensor.shape[0]] if "token_embedding" in name else got[name]
        torch.testing.assert_close(value, tensor, atol=TOL, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("tp,world,bucket_size,overlap,shared_memory", [
    (1, 2, 40_000_000, True, True),  # one bucket, reduce-scatter and all-gather through /dev/shm
    (1, 4, 20_000, True, False),  # several buckets, reduced through gloo while backward runs
    (2, 4, 20_000, False, True),  # several buckets, TP=2 x DP=2 through /dev/shm
])
def test_zero1_matches_unsharded_adamw(reference, tp, world, bucket_size, overlap, shared_memory):
    results = run_ranks(world, _train, tp, "distributed_fused_adam", reference["initial"], None, bucket_size, overlap,
                        shared_memory)
    moved = max((reference["state"][k] - reference["initial"][k]).abs().max().item()
                for k in reference["state"] if torch.is_tensor(reference["state"][k]))
    assert moved > 1e-3  # the comparison is about real updates
    for r in results:
        assert (r["buckets"] > 1) == (bucket_size < 100_000)
        assert r["shm"] == shared_memory  # the route under test was the one taken
        _assert_params(r["state"], reference["state"])
        assert r["norms"] == pytest.approx(reference["norms"], rel=1e-5)
        assert not any(r["skipped"])


def test_zero1_state_is_sharded(reference):
    """The two Adam moments (fp32 parameters are their own master) divided over DP; compare with
    the same optimizer unsharded."""
    sharded = run_ranks(2, _train, 1, "distributed_fused_adam", reference["initial"])
    unsharded = run_ranks(1, _train, 1, "distributed_fused_adam", reference["initial"])[0]
    for r in sharded:
        # one padding element (8 bytes of moments) at most per rank
        assert r["state_bytes"] <= unsharded["state_bytes"] / 2 + 8
        assert r["state_bytes"] >= unsharded["state_bytes"] / 2 - 8


def test_injected_inf_skips_on_every_rank(reference):
    results = run_ranks(2, _train, 1, "distributed_fused_adam", reference["initial"], 1)
    for r in results:
        assert r["skipped"] == [True, True, False, False]
        # hysteresis 2: the first overflow keeps the scale, the second halves it
        assert r["scales"] == [1024, 512, 512, 512]
    # both ranks hold the same parameters afterwards (the skip was agreed, then two real steps)
    for name, tensor in results[0]["state"].items():
        if torch.is_tensor(tensor):
            assert torch.equal(tensor, results[1]["state"][name]), name
