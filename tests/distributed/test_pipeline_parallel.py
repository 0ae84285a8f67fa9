"""Pipeline parallelism (1F1B) against the single-process run with the same micro-batches (fp32).

The reference is PP=1 with the same M micro-batches (gradient accumulation): the contrastive loss
is computed per micro-batch in both, so the two are the same sum of the same terms. With DP the
reference micro-batch is the concatenation of the DP ranks' micro-batches (the loss gathers
features over DP). Tolerance 1e-5 absolute and relative: the layouts reorder float sums only.
"""
import pytest
import torch

from tests.distributed.clip_fixtures import tiny_batch, tiny_clip_config
from tests.distributed.harness import run_ranks

TOL = 1e-5
MICRO_BATCHES = 4
MICRO_BATCH = 2  # per DP rank


class _NoOptimizer:
    def prepare_backward(self, last_micro_batch):
        pass


def _config():
    cfg = tiny_clip_config()
    cfg.vision.num_layers = cfg.text.num_layers = 4
    return cfg


def _run(tp: int, pp: int, sequence_parallel: bool, full_state: dict | None, micro_batch: int = MICRO_BATCH):
    from functools import partial

    from models.clip.family import clip_forward_step
    from engine.schedules import forward_backward
    from models.clip.loss import ContrastiveLoss
    from models.clip.model import CLIPModel
    from parallel.context import initialize_parallel
    from parallel.data_parallel import GradientAverager
    from parallel.p2p import StageLink
    from parallel.pp_sharding import gather_pipeline_state, stage_state_from_full
    from parallel.sequence_parallel import allreduce_sequence_parallel_grads
    from parallel.tp_sharding import (
        gather_full_grads,
        gather_full_state_dict,
        shard_full_state_dict,
    )

    ctx = initialize_parallel(tp, pp, device="cpu", seed=11)
    cfg = _config()
    model = CLIPModel(cfg, sequence_parallel=sequence_parallel)
    if full_state is not None:
        stage = stage_state_from_full(full_state, model)
        model.load_state_dict(shard_full_state_dict(stage, model, ctx.tp_rank, tp), strict=True)
    dp, rank = ctx.dims.dp, ctx.dp_rank
    images, tokens = tiny_batch(MICRO_BATCHES * micro_batch * dp, seed=5, cfg=cfg)

    def micro_batches():
        for j in range(MICRO_BATCHES):
            rows = slice((j * dp + rank) * micro_batch, (j * dp + rank + 1) * micro_batch)
            yield {"images": images[rows], "tokens": tokens[rows]}

    loss_fn = ContrastiveLoss(group=ctx.dp_group)
    result = forward_backward(model=model, forward_step=partial(clip_forward_step, loss_fn, ctx.device),
                              data_iter=micro_batches(), num_micro_batches=MICRO_BATCHES,
                              link=StageLink(ctx.device) if pp > 1 else None, optimizer=_NoOptimizer())
    GradientAverager(model.parameters(), ctx.dp_group).average()
    allreduce_sequence_parallel_grads(model.parameters())
    grads = gather_pipeline_state(gather_full_grads(model, ctx.tp_group), model, ctx.pp_group)
    state = gather_pipeline_state(gather_full_state_dict(model, ctx.tp_group), model, ctx.pp_group)
    return {"loss": result.loss_sum / MICRO_BATCHES, "last_stage": model.post_process, "grads": grads,
            "state": state, "samples": result.samples, "first_stage": model.pre_process}


@pytest.fixture(scope="module")
def reference():
    return run_ranks(1, _run, 1, 1, False, None)[0]


def _check(results, reference):
    last = [r for r in results if r["last_stage"]]
    for r in last:
        torch.testing.assert_close(r["loss"], reference["loss"], atol=TOL, rtol=TOL)
    # Only the first stage reads data, and it counts every sample it fed.
    assert {r["samples"] for r in results if r["first_stage"]} == {MICRO_BATCHES * MICRO_BATCH}
    assert {r["samples"] for r in results if not r["first_stage"]} <= {0}
    for r in results:
        assert r["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            got = r["grads"][name][: grad.shape[0]] if "token_embedding" in name else r["grads"][name]
            torch.testing.assert_close(got, grad, atol=TOL, rtol=TOL, msg=lambda m: f"{name}: {m}")


def test_pp2_matches_accumulation(reference):
    _check(run_ranks(2, _run, 1, 2, False, reference["state"]), reference)


def test_pp4_matches_accumulation(reference):
    """Four stages of one layer per tower: warm-up longer than one micro-batch, middle stages."""
    _check(run_ranks(4, _run, 1, 4, False, reference["state"]), reference)


def test_pp2_tp2_dp2_matches_single_process():
    """8 ranks: the reference micro-batch concatenates the two DP ranks' micro-batches."""
    ref = run_ranks(1, _run, 1, 1, False, None, 2 * MICRO_BATCH)[0]
    ref["samples"] //= 2  # compared with one DP rank's count
    _check(run_ranks(8, _run, 2, 2, False, ref["state"]), ref)


def test_sequence_parallel_matches_tp(reference):
    """TP=2 with sequence parallelism equals TP=1 (vision: 17 tokens, padded to 18 and masked)."""
    _check(run_ranks(2, _run, 2, 1, True, reference["state"]), reference)


def test_sequence_parallel_with_pipeline(reference):
    _check(run_ranks(4, _run, 2, 2, True, reference["state"]), reference)
