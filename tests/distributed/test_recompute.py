"""Activation checkpointing (NeMo keys, megatron-core recompute) gives the same gradients as none.

megatron-core's checkpoint function restores the RNG state (through the CPU shims on CPU) and
recomputes the same ops, so outputs and gradients are expected to be bit-identical; the test allows
1e-6 to stay robust to kernel choice. Dropout is on so that an RNG mismatch would show.
"""
import pytest
import torch

from tests.distributed.clip_fixtures import tiny_batch, tiny_clip_config
from tests.distributed.harness import run_ranks

SETTINGS = {
    "none": (None, None, None),
    "full_uniform": ("full", "uniform", 1),
    "full_block": ("full", "block", 1),
    "selective": ("selective", None, None),
}


def _grads_all(tp: int, full_state: dict):
    """Every setting in one process (one process group), each on a fresh model with the same weights."""
    return {setting: _grads(tp, setting, full_state) for setting in SETTINGS}


def _grads(tp: int, setting: str, full_state: dict | None):
    from models.clip.loss import ContrastiveLoss
    from models.clip.model import CLIPModel
    from parallel.context import initialize_parallel
    from parallel.tp_sharding import gather_full_grads, gather_full_state_dict, shard_full_state_dict

    ctx = initialize_parallel(tp, 1, device="cpu", seed=21)
    cfg = tiny_clip_config()
    granularity, method, layers = SETTINGS[setting]
    for tower in (cfg.vision, cfg.text):
        tower.activations_checkpoint_granularity = granularity
        tower.activations_checkpoint_method = method
        tower.activations_checkpoint_num_layers = layers
        tower.hidden_dropout = tower.attention_dropout = 0.1
    model = CLIPModel(cfg)
    if full_state is not None:
        model.load_state_dict(shard_full_state_dict(full_state, model, ctx.tp_rank, tp))
    images, tokens = tiny_batch(6, seed=2, cfg=cfg)
    _seed_streams(21)  # every setting starts from the same dropout streams
    loss = ContrastiveLoss(group=ctx.dp_group)(*model(images, tokens))
    loss.backward()
    return {"loss": loss.detach(), "grads": gather_full_grads(model, ctx.tp_group),
            "state": gather_full_state_dict(model, ctx.tp_group)}


def _seed_streams(seed: int):
    from parallel.random import seed_everything

    seed_everything(seed)


@pytest.fixture(scope="module")
def weights():
    return run_ranks(1, _grads, 1, "none", None)[0]["state"]


@pytest.mark.parametrize("tp", [1, 2])
def test_recompute_matches_no_recompute(weights, tp):
    results = run_ranks(tp, _grads_all, tp, weights)[0]
    base = results["none"]
    for setting, res in results.items():
        torch.testing.assert_close(res["loss"], base["loss"], atol=1e-6, rtol=0)
        for name, grad in base["grads"].items():
            torch.testing.assert_close(res["grads"][name], grad, atol=1e-6, rtol=0,
                                       msg=lambda m: f"{setting} {name}: {m}")


def test_selective_rejects_te_only_modules():
    from models.clip.config import VisionConfig
    from models.clip.model import recompute_settings

    bad = VisionConfig(activations_checkpoint_granularity="full")
    with pytest.raises(ValueError, match="needs activations_checkpoint_method"):
        recompute_settings(bad)
    bad = VisionConfig(activations_checkpoint_granularity="partial")
    with pytest.raises(ValueError, match="use full, selective or null"):
        recompute_settings(bad)
