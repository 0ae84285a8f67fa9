"""Distillation at DP=2 (gloo) against the one-process run on the concatenated batch.

Every mode, with local_loss off and on (gather_with_grad), and FastCLIP v3 + feature distillation
(the seed's recipe): the ranks' mean loss and the DP-averaged gradients equal the one-process
loss and gradients within 1e-5 (fp32; the DP run reorders sums).
"""
import pytest
import torch

from models.clip.distill import DISTILL_MODES
from tests.distributed.fastclip_fixtures import TinyFeatures, dataset
from tests.distributed.harness import run_ranks

TOL = 1e-5
GLOBAL_BATCH, DATA_SIZE = 8, 10
CASES = [(mode, local) for mode in DISTILL_MODES for local in (False, True)] + [("feature", "fastclip")]


def _loss(mode, local, group):
    from models.clip.distill import DistillConfig
    from models.clip.loss_factory import LossConfig, create_loss

    name = "fastclip" if local == "fastclip" else "clip"
    cfg = LossConfig(name=name, version="v3", data_size=DATA_SIZE, gamma_decay_epochs=2)
    return create_loss(cfg, group=group, local_loss=local is True, distill=DistillConfig(mode=mode, weight=0.5))


def _run(cases):
    from parallel.context import initialize_parallel

    ctx = initialize_parallel(1, 1, device="cpu", seed=0)
    return _compute(cases, ctx.dp_group, ctx.dims.dp, ctx.dp_rank)


def _compute(cases, group=None, dp=1, rank=0):
    """Each case's loss and DP-averaged gradients; group=None is the one-process run."""
    import torch.distributed as dist
    x_image, x_text = dataset(DATA_SIZE)
    index = torch.tensor([3, 0, 7, 9, 1, 4, 8, 2])
    local = index[rank * GLOBAL_BATCH // dp:(rank + 1) * GLOBAL_BATCH // dp]
    out = {}
    for mode, flag in cases:
        student, teacher = TinyFeatures(seed=3), TinyFeatures(seed=8, temperature=0.05)
        loss_fn = _loss(mode, flag, group)
        image, text, scale = student(x_image[local], x_text[local])
        with torch.no_grad():
            t_image, t_text, t_scale = teacher(x_image[local], x_text[local])
        extra = {"sample_index": local, "epoch": 1} if loss_fn.needs_sample_index else {}
        loss = loss_fn(image, text, scale, t_image, t_text, t_scale, **extra)
        loss.backward()
        grads = {}
        for name, p in student.named_parameters():
            g = p.grad.clone()
            if dp > 1:
                dist.all_reduce(g, group=group)
            grads[name] = g / dp
        out[(mode, flag)] = (loss.detach(), grads)
    return out


@pytest.fixture(scope="module")
def runs():
    return _compute(CASES), run_ranks(2, _run, CASES)


@pytest.mark.parametrize("case", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_dp2_matches_one_process(runs, case):
    ref, ranks = runs
    ref_loss, ref_grads = ref[case]
    torch.testing.assert_close(torch.stack([r[case][0] for r in ranks]).mean(), ref_loss, atol=TOL, rtol=TOL)
    for r in ranks:
        for name, want in ref_grads.items():
            torch.testing.assert_close(r[case][1][name], want, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"{n}: {m}")
