"""DP gradient averaging with bucket-view gradients, overlapped with the last backward, against
plain backward + an all-reduce per parameter on the same weights and data (2 gloo ranks, fp32).

Tolerance 1e-6 relative and absolute: the averager divides before summing, the reference after.
With shared memory (every rank on this host) the buckets are averaged in one segment after backward:
the same comparisons. Row-sparse parameters (the token embedding) are checked
against a dense all-reduce of the same divided gradient: exactly equal (the same additions, the other rows being zero everywhere).
"""
import torch

from tests.distributed.clip_fixtures import tiny_batch, tiny_clip_config
from tests.distributed.harness import run_ranks

TOL = 1e-6
MICRO_BATCHES = 2


def _run(overlap: bool, row_sparse: bool = False, host_shared_memory: bool = False):
    import torch.distributed as dist

    from models.clip.loss import ContrastiveLoss
    from models.clip.model import CLIPModel
    from parallel.context import initialize_parallel
    from parallel.data_parallel import GradientAverager

    # The averager takes its shared-memory setting from here (`parallel.host_shared_memory`).
    ctx = initialize_parallel(1, 1, device="cpu", seed=3, host_shared_memory=host_shared_memory)
    torch.manual_seed(3)  # the same weights on both ranks and in both models
    cfg = tiny_clip_config()
    model, reference = CLIPModel(cfg), CLIPModel(cfg)
    reference.load_state_dict(model.state_dict())
    # 64 KiB buckets: many buckets, so most are launched while backward still runs
    sparse = [model.text.token_embedding.weight] if row_sparse else []
    averager = GradientAverager(model.parameters(), ctx.dp_group, bucket_size_mb=1 / 16, overlap=overlap,
                                row_sparse=sparse)
    loss_fn = ContrastiveLoss(group=ctx.dp_group)
    out = {"launched_in_backward": [], "grads_are_views": []}
    for step in range(2):  # the second step checks zero_grad keeps the views and resets the sums
        averager.zero_grad()
        reference.zero_grad(set_to_none=True)
        for micro in range(MICRO_BATCHES):
            images, tokens = tiny_batch(4, seed=100 * step + 10 * micro + ctx.dp_rank, cfg=cfg)
            averager.prepare_backward(last_micro_batch=micro == MICRO_BATCHES - 1)
            (loss_fn(*model(images, tokens)) / MICRO_BATCHES).backward()
            (loss_fn(*reference(images, tokens)) / MICRO_BATCHES).backward()
        out["launched_in_backward"].append(averager.launched_in_backward)
        averager.average()
        for p in reference.parameters():
            dist.all_reduce(p.grad, group=ctx.dp_group)
            p.grad /= dist.get_world_size(ctx.dp_group)
        out.setdefault("rows_reduced", []).append(averager.rows_reduced)
        out["grads_are_views"].append(all(
            p.grad.data_ptr() == view.data_ptr() for b in averager.buckets for p, view in zip(b.params, b.views)))
        out[f"grads{step}"] = [p.grad.clone() for p in model.parameters()]
        out[f"reference{step}"] = [p.grad.clone() for p in reference.parameters()]
    out["buckets"] = len(averager.buckets)
    out["segments"] = len(averager.segments)
    out["vocab_rows"] = model.text.token_embedding.weight.shape[0]
    return out


def _check(results):
    for r in results:
        for step in range(2):
            for got, want in zip(r[f"grads{step}"], r[f"reference{step}"]):
                torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
        assert all(r["grads_are_views"])
    for got, want in zip(results[0]["grads1"], results[1]["grads1"]):  # replicas agree exactly
        assert torch.equal(got, want)


def test_overlapped_average_matches_allreduce_per_parameter():
    results = run_ranks(2, _run, True)
    _check(results)
    r = results[0]
    assert r["buckets"] > 4
    # every bucket but possibly the last (the embeddings, whose gradients arrive last) goes during backward
    assert all(n >= r["buckets"] - 1 for n in r["launched_in_backward"]), r


def test_average_without_overlap_matches_too():
    results = run_ranks(2, _run, False)
    _check(results)
    assert results[0]["launched_in_backward"] == [0, 0] and results[0]["segments"] == 0


def test_token_embedding_reduced_over_its_touched_rows_only():
    results = run_ranks(2, _run, True, True)
    _check(results)
    r = results[0]
    # 2 ranks x 2 micro-batches x 4 captions x 12 tokens touch at most 192 of the 512 rows
    assert all(0 < n <= 192 for n in r["rows_reduced"]), r["rows_reduced"]
    assert r["vocab_rows"] == 512


def _row_sparse_cases(case: str):
    import torch.distributed as dist

    from parallel.context import initialize_parallel
    from parallel.data_parallel import GradientAverager

    ctx = initialize_parallel(1, 1, device="cpu", seed=5)
    torch.manual_seed(5)
    table = torch.nn.Embedding(64, 8)
    averager = GradientAverager(table.parameters(), ctx.dp_group, row_sparse=[table.weight], shared_memory=False)
    rank = ctx.dp_rank
    averager.zero_grad()
    averager.prepare_backward(last_micro_batch=True)
    ids = {"sparse": [[1, 2, 3], [3, 40, 41]], "dense": [list(range(0, 40)), list(range(20, 64))],
           "nan": [[1, 2], [5, 6]], "unused": [[7, 8, 9], None]}[case][rank]
    if ids is not None:
        loss = (table(torch.tensor(ids)) * torch.randn(len(ids), 8)).sum()
        if case == "nan" and rank == 1:
            loss = loss * float("nan")
        loss.backward()
    local = None if table.weight.grad is None else table.weight.grad.clone()
    averager.average()
    want = torch.zeros(64, 8) if local is None else local.clone()
    want /= 2
    dist.all_reduce(want)
    return {"got": table.weight.grad.clone(), "want": want, "rows": averager.rows_reduced}


def test_row_sparse_average_cases():
    sparse = run_ranks(2, _row_sparse_cases, "sparse")
    for r in sparse:
        assert torch.equal(r["got"], r["want"]) and r["rows"] == 5  # rows 1, 2, 3, 40, 41
    dense = run_ranks(2, _row_sparse_cases, "dense")  # 40 and 44 of 64 rows: one dense all-reduce
    for r in dense:
        assert torch.equal(r["got"], r["want"]) and r["rows"] == 64
    nan = run_ranks(2, _row_sparse_cases, "nan")  # rank 1's NaN rows reach rank 0's overflow check
    for r in nan:
        assert torch.isnan(r["got"][5:7]).all() and not torch.isnan(r["got"][1:3]).any(), r["got"][:8]
    unused = run_ranks(2, _row_sparse_cases, "unused")  # no gradient on rank 1 counts as zero
    for r in unused:
        assert torch.equal(r["got"], r["want"]) and r["rows"] == 3


def test_shared_memory_average_matches_allreduce_per_parameter():
    results = run_ranks(2, _run, True, True, True)  # 3 ranks: tests/distributed/test_host_allreduce.py
    _check(results)
    assert results[0]["segments"] == 1 and results[0]["launched_in_backward"] == [0, 0]
