"""The VLM at TP=2 and PP=2 against TP=1/PP=1 with the same weights and micro-batches (fp32): the
loss and every gradient within 1e-5; also TP=2 x PP=2 (4 ranks), and at TP=2 with the LLM sequence-parallel.

Two variants: `mlp` (mlp2x_gelu connector, everything trains, features of layer -2 without the
class token) and `perceiver` (resampler connector, the vision tower frozen, features of the last
layer with the class token). Micro-batch 2 is text-only: the trainable image-path parameters
still get a gradient (zero from it), so every rank reduces the same parameters; a frozen tower
gets none at all. Under PP the vision tower and the connector sit on the first stage.
"""
import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.vlm_fixtures import conversation_batches, tiny_vlm_config

TOL = 1e-5
MICRO_BATCHES = 4
VARIANTS = {"mlp": {"connector": "mlp", "use_cls": False, "feature_select_index": -2, "freeze_vision": False},
            "perceiver": {"connector": "perceiver", "use_cls": True, "feature_select_index": -1, "freeze_vision": True}}


class _NoOptimizer:
    def prepare_backward(self, last_micro_batch):
        pass


def _config(variant):
    v = VARIANTS[variant]
    return tiny_vlm_config(v["connector"], use_cls=v["use_cls"], feature_select_index=v["feature_select_index"])


def _run_variant(ctx, variant, tp, pp, full_state, sequence_parallel=False):
    from engine.schedules import forward_backward
    from models.vlm.model import VLMModel, freeze_parts, vlm_forward_step
    from parallel.p2p import StageLink
    from parallel.pp_sharding import gather_pipeline_state, stage_state_from_full
    from parallel.sequence_parallel import allreduce_sequence_parallel_grads
    from parallel.tp_sharding import (
        gather_full_grads,
        gather_full_state_dict,
        shard_full_state_dict,
    )

    torch.manual_seed(21)
    cfg = _config(variant)
    model = VLMModel(cfg, sequence_parallel=sequence_parallel)
    assert model.llm.sequence_parallel.enabled == sequence_parallel
    freeze_parts(model, vision=VARIANTS[variant]["freeze_vision"], connector=False, llm=False)
    if full_state is not None:
        stage = stage_state_from_full(full_state, model)
        model.load_state_dict(shard_full_state_dict(stage, model, ctx.tp_rank, tp), strict=True)
    first, last = model.pre_process, model.post_process
    batches = conversation_batches(cfg.image_tokens, MICRO_BATCHES)
    result = forward_backward(model=model, forward_step=vlm_forward_step, data_iter=iter(batches),
                              num_micro_batches=MICRO_BATCHES, link=StageLink(ctx.device) if pp > 1 else None,
                              optimizer=_NoOptimizer(), reads_data=first or last)
    allreduce_sequence_parallel_grads(model.parameters())  # the LLM's SP norms, summed over TP (the optimizer's job)
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    return {"loss": result.loss_sum / MICRO_BATCHES, "first": first, "last": last,
            "frozen_with_grad": frozen_with_grad,
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
            "grads": gather_pipeline_state(gather_full_grads(model, ctx.tp_group), model, ctx.pp_group),
            "state": gather_pipeline_state(gather_full_state_dict(model, ctx.tp_group), model, ctx.pp_group)}


def _run(tp, pp, full_states):
    from parallel.context import initialize_parallel

    ctx = initialize_parallel(tp, pp, device="cpu", seed=11)
    out = {v: _run_variant(ctx, v, tp, pp, full_states and full_states[v]) for v in VARIANTS}
    if tp == 2:  # the LLM with sequence parallelism (the image path never uses it)
        out["sp/mlp"] = _run_variant(ctx, "mlp", tp, pp, full_states["mlp"], sequence_parallel=True)
    return out


@pytest.fixture(scope="module")
def reference():
    return run_ranks(1, _run, 1, 1, None)[0]


def _check(results, reference, prefix=""):
    worst = 0.0
    for variant, ref in reference.items():
        if prefix + variant not in results[0]:
            continue
        for r in (res[prefix + variant] for res in results):
            assert r["frozen_with_grad"] == []
            if r["last"]:
                torch.testing.assert_close(r["loss"], ref["loss"], atol=TOL, rtol=TOL)
                worst = max(worst, (r["loss"] - ref["loss"]).abs().item())
            assert r["grads"].keys() == ref["grads"].keys(), variant
            for name, grad in ref["grads"].items():
                got = r["grads"][name]
                if got.shape[0] > grad.shape[0]:  # vocabulary padding of another TP: no gradient there
                    assert got[grad.shape[0]:].abs().max() == 0, name
                    got = got[: grad.shape[0]]
                torch.testing.assert_close(got, grad, atol=TOL, rtol=TOL, msg=lambda m, what=f"{variant} {name}": f"{what}: {m}")
                worst = max(worst, (got - grad).abs().max().item())
    print(f"max abs difference to TP=1/PP=1 (loss, grads): {worst:.2e}")


def test_reference_trains_the_right_parts(reference):
    mlp, perceiver = reference["mlp"], reference["perceiver"]
    # everything trains in `mlp`: the vision tower and connector have non-zero gradients
    assert mlp["grads"]["vision.conv1.weight"].abs().sum() > 0
    assert mlp["grads"]["connector.linear_fc1.weight"].abs().sum() > 0
    assert mlp["grads"]["llm.decoder.layers.1.mlp.linear_fc1.weight"].abs().sum() > 0
    # the perceiver variant's tower is frozen: no gradient at all, the resampler and the LLM train
    assert not any(n.startswith("vision.") for n in perceiver["grads"])
    assert not any(n.startswith("vision.") for n in perceiver["trainable"])
    assert perceiver["grads"]["connector.latents"].abs().sum() > 0
    assert perceiver["grads"]["connector.layers.0.linear_kv.weight"].abs().sum() > 0
    # feature_select_index=-2 of 3 layers builds 2; -1 builds all 3
    assert "vision.transformer.layers.1.mlp.linear_fc1.weight" in mlp["state"]
    assert "vision.transformer.layers.2.mlp.linear_fc1.weight" not in mlp["state"]
    assert "vision.transformer.layers.2.mlp.linear_fc1.weight" in perceiver["state"]
    assert not any("final_layernorm" in n and n.startswith("vision.") for n in perceiver["state"])


def test_text_only_micro_batch_gives_zero_image_path_gradient():
    """A text-only micro-batch alone: every trainable vision/connector parameter has a gradient
    tensor, and it is zero (the dummy contribution); the LLM's is not."""
    results = run_ranks(1, _text_only)[0]
    assert results["vision_grads_exist"] and results["vision_grad_max"] == 0.0
    assert results["llm_grad_max"] > 0


def _text_only():
    from models.vlm.model import VLMModel
    from parallel.context import initialize_parallel

    initialize_parallel(1, 1, device="cpu", seed=3)
    torch.manual_seed(0)
    cfg = tiny_vlm_config("mlp")
    model = VLMModel(cfg)
    batch = conversation_batches(cfg.image_tokens, 3, text_only=(0, 1, 2))[0]
    assert batch["images"].shape[0] == 0
    loss = model(batch["tokens"], batch["images"], batch["image_index"], batch["labels"], batch["loss_mask"])
    loss.backward()
    image_path = [p for n, p in model.named_parameters() if n.startswith(("vision.", "connector."))]
    return {"vision_grads_exist": all(p.grad is not None for p in image_path),
            "vision_grad_max": max(p.grad.abs().max().item() for p in image_path),
            "llm_grad_max": model.llm.decoder.layers[0].mlp.linear_fc1.weight.grad.abs().max().item()}


def test_tp2_with_and_without_sequence_parallel_matches_single_process(reference):
    results = run_ranks(2, _run, 2, 1, {v: reference[v]["state"] for v in VARIANTS})
    _check(results, reference)
    _check(results, reference, prefix="sp/")


def test_pp2_matches_single_process(reference):
    _check(run_ranks(2, _run, 1, 2, {v: reference[v]["state"] for v in VARIANTS}), reference)


def test_tp2_pp2_matches_single_process(reference):
    results = run_ranks(4, _run, 2, 2, {v: reference[v]["state"] for v in VARIANTS})
    _check(results, reference)
    _check(results, reference, prefix="sp/")
