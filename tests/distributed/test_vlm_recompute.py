"""Activation recompute set per part of the VLM (model.vision.* and model.llm.*
activations_checkpoint_{granularity,method,num_layers}, NeMo's keys) gives the loss and gradients of
no recompute, at TP=1 and TP=2.

megatron-core's checkpoint function restores the RNG state (the CPU shims on CPU) and reruns the same
ops, so the results are expected bit-identical (measured: 0.0 difference in the loss and every
gradient, TP=1 and TP=2); the test allows 1e-6 (fp32) as the CLIP and LLM recompute tests do.
Dropout is on in both parts so that an RNG mismatch would show; every part trains (the tower too)
so that its recomputed backward is compared. Each setting also checks the part's megatron-core
config took the keys (a setting that silently did nothing would compare equal).
"""
import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.vlm_fixtures import conversation_batches, tiny_vlm_config

NONE = (None, None, None)
SETTINGS = {  # name: (vision keys, llm keys)
    "none": (NONE, NONE),
    "vision_full_uniform": (("full", "uniform", 1), NONE),
    "llm_full_block": (NONE, ("full", "block", 1)),
    "both_selective": (("selective", None, None), ("selective", None, None)),
    "vision_full_block_llm_full_uniform": (("full", "block", 2), ("full", "uniform", 1)),
}


def _configured(setting: str):
    cfg = tiny_vlm_config("mlp")
    for part, keys in zip((cfg.vision, cfg.llm), SETTINGS[setting]):
        (part.activations_checkpoint_granularity, part.activations_checkpoint_method,
         part.activations_checkpoint_num_layers) = keys
        part.hidden_dropout = part.attention_dropout = 0.1
    return cfg


def _grads(ctx, setting: str, full_state: dict | None):
    from models.vlm.model import VLMModel, vlm_forward_step
    from parallel.random import seed_everything
    from parallel.tp_sharding import gather_full_grads, gather_full_state_dict, shard_full_state_dict

    model = VLMModel(_configured(setting), use_cpu_initialization=True)
    if full_state is not None:
        model.load_state_dict(shard_full_state_dict(full_state, model, ctx.tp_rank, ctx.dims.tp))
    applied = {"vision": model.vision.transformer.config.recompute_granularity,
               "llm": model.llm.decoder.config.recompute_granularity}
    batch = conversation_batches(model.image_tokens, num_micro_batches=1, rows=2, text_only=())[0]
    seed_everything(21)  # every setting starts from the same dropout streams
    loss, _ = vlm_forward_step(model, batch, None)
    loss.backward()
    return {"loss": loss.detach(), "grads": gather_full_grads(model, ctx.tp_group), "applied": applied,
            "state": gather_full_state_dict(model, ctx.tp_group)}


def _all_settings(tp: int):
    """Every setting in one process group, each on a fresh model with the first one's weights."""
    from parallel.context import initialize_parallel

    ctx = initialize_parallel(tp, 1, device="cpu", seed=21)
    results, weights = {}, None
    for setting in SETTINGS:
        results[setting] = _grads(ctx, setting, weights)
        weights = weights or results[setting].pop("state")
    return results


@pytest.mark.parametrize("tp", [1, 2])
def test_recompute_per_part_matches_no_recompute(tp):
    results = run_ranks(tp, _all_settings, tp)[0]
    base = results["none"]
    assert base["grads"] and any(name.startswith("vision.") for name in base["grads"])
    for setting, res in results.items():
        want = tuple(keys[0] for keys in SETTINGS[setting])
        assert (res["applied"]["vision"], res["applied"]["llm"]) == want, setting
        torch.testing.assert_close(res["loss"], base["loss"], atol=1e-6, rtol=0)
        assert res["grads"].keys() == base["grads"].keys()
        for name, grad in base["grads"].items():
            torch.testing.assert_close(res["grads"][name], grad, atol=1e-6, rtol=0,
                                       msg=lambda m, s=setting, n=name: f"{s} {n}: {m}")
