"""FastCLIP over DP (gloo) against the one-process computation on the concatenated batch.

- DP=2, every version: per-rank losses averaged and DP-averaged gradients equal the float64
  whole-batch reference (tests/distributed/fastclip_fixtures.py), and so does the sharded state
  assembled from both ranks (tolerance 1e-5 relative, 2e-5 absolute: fp32 vs fp64).
- TP2 x DP2 with a tiny CLIP: loss and gradients equal the TP=1, DP=1 run within 1e-5.
- The per-sample state is sharded by index (each rank holds half), restores bit-identically
  mid-epoch at DP=2, and reshards DP=2 -> DP=1 exactly (the continuation then agrees within 1e-5).
"""
import copy

import pytest
import torch

from models.clip.fastclip import FastCLIPConfig
from models.clip.sample_state import assemble_full
from tests.distributed.clip_fixtures import tiny_batch, tiny_clip_config
from tests.distributed.fastclip_fixtures import (
    ReferenceFastCLIP,
    TinyFeatures,
    dataset,
    double_copy,
    schedule,
)
from tests.distributed.harness import run_ranks

RTOL, ATOL = 1e-5, 2e-5
DATA_SIZE, GLOBAL_BATCH, STEPS = 13, 8, 4
LR_TAU = 2e-3
VERSIONS = ["v0", "v1", "v2", "v3", "isogclr"]


def make_cfg(version, **kw):
    return FastCLIPConfig(version=version, data_size=DATA_SIZE, gamma=0.6, gamma_decay_epochs=3, rho=6.5,
                          lr_tau=LR_TAU, **kw)


def _dp_step(model, loss_fn, x_image, x_text, idx, epoch, dp, rank, group):
    import torch.distributed as dist

    local = idx[rank * len(idx) // dp:(rank + 1) * len(idx) // dp]
    model.zero_grad(set_to_none=True)
    loss = loss_fn(*model(x_image[local], x_text[local]), local, epoch)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            grads[name] = None
            continue
        g = p.grad.clone()
        if dp > 1:
            dist.all_reduce(g, group=group)
        grads[name] = g / dp
    return loss.detach(), grads


def _run_dp(versions, resume_version, half):
    from parallel.context import initialize_parallel

    ctx = initialize_parallel(1, 1, device="cpu", seed=0)
    return {"versions": _run_versions(ctx, versions), "resume": _run_resume(ctx, resume_version, half)}


def _run_versions(ctx, versions):
    from models.clip.fastclip import FastCLIPLoss, init_logit_scale_

    dp, rank = ctx.dims.dp, ctx.dp_rank
    x_image, x_text = dataset(DATA_SIZE)
    steps = schedule(DATA_SIZE, GLOBAL_BATCH, STEPS, duplicate=True)
    out = {}
    for version in versions:
        cfg = make_cfg(version)
        model = TinyFeatures(seed=3)
        init_logit_scale_(model.logit_scale, cfg)
        loss_fn = FastCLIPLoss(cfg, group=ctx.dp_group)
        record = [_dp_step(model, loss_fn, x_image, x_text, idx, epoch, dp, rank, ctx.dp_group) for idx, epoch in steps]
        out[version] = {"steps": record, "state": loss_fn.sample_state.state_dict(),
                        "bytes": loss_fn.sample_state.bytes_per_rank(),
                        "full_bytes": loss_fn.sample_state.full_copy_bytes()}
    return out


def _run_resume(ctx, version, half):
    """Straight run of all steps vs stop after `half`, rebuild the loss, load its state, go on."""
    from models.clip.fastclip import FastCLIPLoss, init_logit_scale_

    dp, rank = ctx.dims.dp, ctx.dp_rank
    x_image, x_text = dataset(DATA_SIZE)
    steps = schedule(DATA_SIZE, GLOBAL_BATCH, STEPS)
    cfg = make_cfg(version)
    model = TinyFeatures(seed=3)
    init_logit_scale_(model.logit_scale, cfg)
    straight = FastCLIPLoss(cfg, group=ctx.dp_group)
    first = [_dp_step(model, straight, x_image, x_text, i, e, dp, rank, ctx.dp_group) for i, e in steps[:half]]
    saved = copy.deepcopy(straight.sample_state.state_dict())
    rest = [_dp_step(model, straight, x_image, x_text, i, e, dp, rank, ctx.dp_group) for i, e in steps[half:]]
    resumed = FastCLIPLoss(cfg, group=ctx.dp_group)
    resumed.sample_state.load_state_dict(saved)
    again = [_dp_step(model, resumed, x_image, x_text, i, e, dp, rank, ctx.dp_group) for i, e in steps[half:]]
    return {"first": first, "rest": rest, "again": again, "saved": saved,
            "final": straight.sample_state.state_dict(), "final_resumed": resumed.sample_state.state_dict()}


@pytest.fixture(scope="module")
def dp2_runs():
    return run_ranks(2, _run_dp, VERSIONS, "v2", 2)


@pytest.fixture(scope="module")
def dp2(dp2_runs):
    return [r["versions"] for r in dp2_runs]


@pytest.mark.parametrize("version", VERSIONS)
def test_dp2_matches_whole_batch_reference(dp2, version):
    x_image, x_text = dataset(DATA_SIZE)
    steps = schedule(DATA_SIZE, GLOBAL_BATCH, STEPS, duplicate=True)
    cfg = make_cfg(version)
    model = TinyFeatures(seed=3)
    from models.clip.fastclip import init_logit_scale_

    init_logit_scale_(model.logit_scale, cfg)
    ref = ReferenceFastCLIP(version, DATA_SIZE, cfg)
    ref_model = double_copy(model)
    ref_model.logit_scale.requires_grad_(model.logit_scale.requires_grad)
    for step, (idx, epoch) in enumerate(steps):
        ref_loss, ref_grads = ref.step(ref_model, x_image, x_text, idx, epoch, lr_tau=LR_TAU)
        ranks = [r[version]["steps"][step] for r in dp2]
        mean_loss = torch.stack([loss for loss, _ in ranks]).mean()
        torch.testing.assert_close(mean_loss.double(), ref_loss, rtol=RTOL, atol=ATOL)
        for _, grads in ranks:
            for name, want in ref_grads.items():
                if want is None:
                    assert grads[name] is None
                else:
                    torch.testing.assert_close(grads[name].double(), want, rtol=RTOL, atol=ATOL,
                                               msg=lambda m, s=step, n=name: f"{version} step {s} {n}: {m}")
    full = assemble_full([r[version]["state"] for r in dp2])
    for name, want in ref.state().items():
        torch.testing.assert_close(full[name].double(), want, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def test_state_is_sharded_by_index(dp2):
    layouts = [r["v2"]["state"]["layout"] for r in dp2]
    assert [(shard["offset"], shard["length"]) for shard in layouts] == [(0, 7), (7, 6)]  # ceil(13 / 2) = 7
    for r, layout in zip(dp2, layouts):
        # 8 states (log u, tau, m, v per modality) in fp32, this rank's block only
        assert r["v2"]["bytes"] == 8 * 4 * layout["length"]
        assert r["v2"]["full_bytes"] == 8 * 4 * DATA_SIZE
        assert r["v1"]["bytes"] == 2 * 4 * layout["length"]


def test_mid_epoch_resume_is_bit_identical(dp2_runs):
    results = [r["resume"] for r in dp2_runs]
    for r in results:
        for (loss, grads), (loss2, grads2) in zip(r["rest"], r["again"]):
            assert torch.equal(loss, loss2)
            assert all(torch.equal(grads[n], grads2[n]) for n in grads if grads[n] is not None)
        for name, value in r["final"]["tensors"].items():
            assert torch.equal(value, r["final_resumed"]["tensors"][name]), name
    # Reshard DP=2 -> DP=1: the two blocks form the canonical tensor; a one-process loss loading it
    # holds exactly that and continues like the DP=2 run.
    from models.clip.fastclip import FastCLIPLoss, init_logit_scale_

    full = assemble_full([r["saved"] for r in results])
    single = FastCLIPLoss(make_cfg("v2"))
    single.sample_state.load_state_dict({"layout": {"data_size": DATA_SIZE}, "tensors": full})
    for name, value in full.items():
        assert torch.equal(single.sample_state.tensors[name], value)
    x_image, x_text = dataset(DATA_SIZE)
    steps = schedule(DATA_SIZE, GLOBAL_BATCH, STEPS)
    model = TinyFeatures(seed=3)
    init_logit_scale_(model.logit_scale, make_cfg("v2"))
    for k, (idx, epoch) in enumerate(steps[2:]):
        loss, grads = _dp_step(model, single, x_image, x_text, idx, epoch, 1, 0, None)
        dp_loss = torch.stack([r["rest"][k][0] for r in results]).mean()
        torch.testing.assert_close(loss, dp_loss, rtol=1e-5, atol=1e-6)
        for name, g in grads.items():
            if g is not None:
                torch.testing.assert_close(g, results[0]["rest"][k][1][name], rtol=1e-5, atol=1e-6)
    resharded_final = assemble_full([r["final"] for r in results])
    for name, value in single.sample_state.tensors.items():
        torch.testing.assert_close(value, resharded_final[name], rtol=1e-5, atol=1e-6)


def test_load_rejects_a_foreign_block():
    from models.clip.sample_state import ShardedSampleState

    state = ShardedSampleState({"a": 0.0}, data_size=10)
    with pytest.raises(ValueError, match="data_size=11"):
        state.load_state_dict({"layout": {"data_size": 11}, "tensors": {"a": torch.zeros(11)}})
    with pytest.raises(ValueError, match="full \\[data_size\\] tensor to reshard"):
        state.load_state_dict({"layout": {"data_size": 10, "offset": 5}, "tensors": {"a": torch.zeros(5)}})
    with pytest.raises(KeyError, match="missing"):
        state.load_state_dict({"layout": {"data_size": 10}, "tensors": {}})


# ---- TP2 x DP2 with a tiny CLIP -----------------------------------------------------------------

CLIP_BATCH, CLIP_DATA = 8, 20


def _run_clip(tp: int, versions, full_state):
    from parallel.context import initialize_parallel

    ctx = initialize_parallel(tp, 1, device="cpu", seed=11)
    return {version: _run_clip_version(ctx, tp, version, full_state) for version in versions}


def _run_clip_version(ctx, tp: int, version: str, full_state):
    from models.clip.fastclip import FastCLIPLoss, init_logit_scale_
    from models.clip.model import CLIPModel
    from parallel.data_parallel import GradientAverager
    from parallel.random import seed_everything
    from parallel.tp_sharding import (
        gather_full_grads,
        gather_full_state_dict,
        shard_full_state_dict,
    )

    seed_everything(11)
    model = CLIPModel(tiny_clip_config())
    if full_state is not None:
        model.load_state_dict(shard_full_state_dict(full_state[version], model, ctx.tp_rank, tp))
    cfg = FastCLIPConfig(version=version, data_size=CLIP_DATA, gamma=0.5, gamma_decay_epochs=2, lr_tau=1e-3)
    init_logit_scale_(model.logit_scale, cfg)
    loss_fn = FastCLIPLoss(cfg, group=ctx.dp_group)
    dp, rank = ctx.dims.dp, ctx.dp_rank
    images, tokens = tiny_batch(CLIP_BATCH, seed=5, cfg=model.cfg)
    losses = []
    for step, index in enumerate((torch.arange(8), torch.tensor([3, 9, 0, 11, 4, 19, 1, 2]))):
        local = slice(rank * CLIP_BATCH // dp, (rank + 1) * CLIP_BATCH // dp)
        model.zero_grad(set_to_none=True)
        loss = loss_fn(*model(images[local], tokens[local]), index[local], epoch=step)
        loss.backward()
        losses.append(loss.detach())
    GradientAverager(model.parameters(), ctx.dp_group).average()
    return {"losses": losses, "grads": gather_full_grads(model, ctx.tp_group),
            "state": gather_full_state_dict(model, ctx.tp_group), "sample_state": loss_fn.sample_state.state_dict()}


CLIP_VERSIONS = ["v3", "v2"]


@pytest.fixture(scope="module")
def clip_runs():
    ref = run_ranks(1, _run_clip, 1, CLIP_VERSIONS, None)[0]
    # Both TP layouts start from the same full weights: the reference's, cut into TP shards.
    results = run_ranks(4, _run_clip, 2, CLIP_VERSIONS, {v: ref[v]["state"] for v in CLIP_VERSIONS})
    return ref, results


@pytest.mark.parametrize("version", CLIP_VERSIONS)
def test_tp2_dp2_clip_matches_single_process(clip_runs, version):
    ref, results = clip_runs
    ref, results = ref[version], [r[version] for r in results]
    for step in range(2):
        mean = torch.stack([r["losses"][step] for r in results]).mean()
        torch.testing.assert_close(mean, ref["losses"][step], rtol=1e-5, atol=1e-5)
    for r in results:
        for name, want in ref["grads"].items():
            got = r["grads"][name][: want.shape[0]] if "token_embedding" in name else r["grads"][name]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # TP ranks of one replica hold the same block; the two DP blocks form the one-process state.
    by_dp = {}
    for r in results:
        by_dp.setdefault(r["sample_state"]["layout"]["offset"], []).append(r["sample_state"])
    assert len(by_dp) == 2 and all(len(v) == 2 for v in by_dp.values())
    for copies in by_dp.values():
        for name in copies[0]["tensors"]:
            assert torch.equal(copies[0]["tensors"][name], copies[1]["tensors"][name])
    full = assemble_full([copies[0] for copies in by_dp.values()])
    for name, value in ref["sample_state"]["tensors"].items():
        torch.testing.assert_close(full[name], value, rtol=1e-5, atol=1e-6)
