"""TP=2 and TP=4 forward outputs and gradients equal TP=1 with the same full weights (fp32, 1e-5).
megatron's TP all-reduces go through shared memory here (every rank on this host): at TP=2 the
result is bit for bit gloo's, whose all-reduce adds the same two numbers."""
import pytest
import torch

from tests.distributed.clip_fixtures import tiny_batch, tiny_clip_config
from tests.distributed.harness import run_ranks

TOL = 1e-5  # absolute and relative, fp32


def _run_clip(tp: int, full_state: dict | None, host_shared_memory: bool = True, short_captions: bool = False,
              trim: bool = True):
    from models.clip.loss import ContrastiveLoss
    from models.clip.model import CLIPModel
    from engine.grad_norm import global_grad_norm
    from engine.memory_estimate import params_per_rank
    from parallel import host_allreduce
    from parallel.context import initialize_parallel
    from parallel.tp_sharding import gather_full_grads, gather_full_state_dict, shard_full_state_dict

    ctx = initialize_parallel(tp, 1, device="cpu", seed=7, host_shared_memory=host_shared_memory)
    cfg = tiny_clip_config()
    cfg.text.trim_to_longest = trim
    model = CLIPModel(cfg)
    if full_state is not None:
        model.load_state_dict(shard_full_state_dict(full_state, model, ctx.tp_rank, tp), strict=True)
    images, tokens = tiny_batch(6, seed=3, cfg=cfg)
    if short_captions:  # every end of text before position 7: a trimmed tower runs 8 of the 12 tokens
        tokens[:, 3:] = torch.where(tokens[:, 3:] == cfg.text.vocab_size - 1, 1, tokens[:, 3:])
        tokens[torch.arange(6), torch.tensor([3, 6, 4, 5, 3, 6])] = cfg.text.vocab_size - 1
    text_lengths = []
    model.text.transformer.register_forward_pre_hook(lambda _m, args: text_lengths.append(args[0].shape[0]))
    image_features, text_features, scale = model(images, tokens)
    loss = ContrastiveLoss(group=ctx.dp_group)(image_features, text_features, scale)
    # Add terms that reach each tower's output directly so a wrong shard cannot hide in the loss.
    (loss + image_features.pow(2).mean() + text_features.mean()).backward()
    reducer = host_allreduce._reducers.get(ctx.tp_group)
    return {
        "host_reducer_calls": reducer.calls if reducer is not None else 0,
        "text_lengths": text_lengths,
        "state": gather_full_state_dict(model, ctx.tp_group),
        "grads": gather_full_grads(model, ctx.tp_group),
        "image": image_features.detach(),
        "text": text_features.detach(),
        "loss": loss.detach(),
        "grad_norm": global_grad_norm(list(model.parameters())),
        "local_params": sum(p.numel() for p in model.parameters()),
        "predicted_params": params_per_rank(cfg, tp),
    }


@pytest.fixture(scope="module")
def reference():
    return run_ranks(1, _run_clip, 1, None)[0]


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_single_process(reference, tp):
    results = run_ranks(tp, _run_clip, tp, reference["state"])
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["image"], reference["image"], atol=TOL, rtol=TOL)
        torch.testing.assert_close(res["text"], reference["text"], atol=TOL, rtol=TOL)
        torch.testing.assert_close(res["loss"], reference["loss"], atol=TOL, rtol=TOL)
        # Replicated parameters are counted once, TP shards summed: the same global norm as TP=1.
        torch.testing.assert_close(res["grad_norm"], reference["grad_norm"], atol=TOL, rtol=TOL)
        assert res["local_params"] == res["predicted_params"]  # the memory estimator's TP split
        assert res["host_reducer_calls"] > 0  # the TP all-reduces took the shared-memory route
        assert res["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            # Vocab padding may differ with TP: compare the rows both layouts hold.
            got = res["grads"][name][: grad.shape[0]] if "token_embedding" in name else res["grads"][name]
            torch.testing.assert_close(got, grad, atol=TOL, rtol=TOL, msg=lambda m: f"rank {rank} {name}: {m}")
    # The gradient check is only meaningful if the towers' gradients are not all zero.
    assert reference["grads"]["visual.transformer.layers.0.self_attention.linear_qkv.weight"].abs().sum() > 0
    assert reference["grads"]["text.token_embedding.weight"].abs().sum() > 0


def test_tp_all_reduce_through_shared_memory_equals_gloo_bitwise(reference):
    shm = run_ranks(2, _run_clip, 2, reference["state"], True)
    gloo = run_ranks(2, _run_clip, 2, reference["state"], False)
    for a, b in zip(shm, gloo):
        assert a["host_reducer_calls"] > 0 and b["host_reducer_calls"] == 0
        for key in ("image", "text", "loss", "grad_norm"):
            assert torch.equal(a[key], b[key]), key
        for name, grad in b["grads"].items():
            assert torch.equal(a["grads"][name], grad), name


def test_tp2_trimmed_text_tower_matches_the_full_context_on_one_process(reference):
    """model.text.trim_to_longest under TP: both ranks cut the same tokens (each TP rank reads the same
    batch), and the result is the full-length tower's on one process (same weights, short captions)."""
    full = run_ranks(1, _run_clip, 1, reference["state"], True, True, False)[0]
    assert full["text_lengths"] == [12]
    for res in run_ranks(2, _run_clip, 2, reference["state"], True, True, True):
        assert res["text_lengths"] == [8]
        for key in ("image", "text", "loss", "grad_norm"):
            torch.testing.assert_close(res[key], full[key], atol=TOL, rtol=TOL, msg=key)
        for name, grad in full["grads"].items():
            got = res["grads"][name][: grad.shape[0]] if "token_embedding" in name else res["grads"][name]
            torch.testing.assert_close(got, grad, atol=TOL, rtol=TOL, msg=lambda m: f"{name}: {m}")
