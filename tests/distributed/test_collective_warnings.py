"""The engine's own collectives raise no FutureWarning (torch 2.14 deprecates `all_gather_into_tensor`
and `reduce_scatter_tensor`, and warns on every call). pytest.ini ignores FutureWarning for the
suite, so the check records warnings itself with an "always" filter inside the ranks."""
from tests.distributed.harness import run_ranks


def _one_zero1_step_and_feature_gather():
    import warnings

    import torch

    from engine.optim import build_optimizer
    from engine.schema import OptimConfig
    from parallel.collectives import all_gather_keep_local_grad, all_gather_with_grad
    from parallel.context import initialize_parallel

    ctx = initialize_parallel(1, 1, device="cpu", seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = build_optimizer(model, OptimConfig(name="distributed_fused_adam", bucket_size=40),
                          dp_group=ctx.dp_group, model_parallel_group=ctx.model_parallel_group, max_grad_norm=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.zero_grad()
        opt.prepare_backward(last_micro_batch=True)
        features = model(torch.randn(4, 8) + ctx.dp_rank)
        gathered = all_gather_with_grad(features, ctx.dp_group)
        gathered_local = all_gather_keep_local_grad(features, ctx.dp_group)
        (gathered.square().sum() + gathered_local.sum()).backward()  # reduce-scatter in ZeRO-1's buckets
        result = opt.step()  # and the parameters' all-gather
    return {"future": [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, FutureWarning)],
            "rows": gathered.shape[0], "skipped": result.skipped}


def test_engine_collectives_raise_no_future_warning():
    for rank, out in enumerate(run_ranks(2, _one_zero1_step_and_feature_gather, timeout=120)):
        assert out["rows"] == 8 and not out["skipped"]
        assert out["future"] == [], f"rank {rank}: " + "\n".join(out["future"])
