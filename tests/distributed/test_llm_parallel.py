"""The LLM at TP=2 (with and without sequence parallelism), PP=2 and TP2xPP2 with SP against TP=1/PP=1 with the same
weights and micro-batches (fp32): loss and every gradient within 1e-5, logits at TP=2 and with SP.
TP=2 also runs a tied, qk-norm variant (the tied embedding gets both gradients; qk-norm gains are
summed over TP) and checks vocab-parallel cross entropy against torch's with and without a mask.

Sequences are 15 tokens so sequence parallelism pads to 16; the vocabulary (300) pads to 320 at
TP=1 and 384 at TP=2, and the extra rows get no gradient.
"""
import pytest
import torch

from tests.distributed.harness import run_ranks

TOL = 1e-5
MICRO_BATCHES, ROWS, SEQ, VOCAB = 4, 2, 15, 300
VARIANTS = {"untied": dict(share_embeddings_and_output_weights=False),
            "tied_qknorm": dict(share_embeddings_and_output_weights=True, qk_layernorm=True)}


class _NoOptimizer:
    def prepare_backward(self, last_micro_batch):
        pass


def _config(variant: str):
    from models.llm.config import llm_preset

    return llm_preset("tiny", vocab_size=VOCAB, seq_length=SEQ, ffn_hidden_size=96, **VARIANTS[variant])


def _batches():
    gen = torch.Generator().manual_seed(4)
    stream = torch.randint(0, VOCAB, (MICRO_BATCHES, ROWS, SEQ + 1), generator=gen)
    mask = (torch.rand(MICRO_BATCHES, ROWS, SEQ, generator=gen) > 0.25).float()
    return [{"tokens": s[:, :-1], "labels": s[:, 1:], "loss_mask": m} for s, m in zip(stream, mask)]


def _run_variant(ctx, variant, tp, pp, sequence_parallel, full_state):
    from engine.schedules import forward_backward
    from models.llm.model import LLMModel, llm_forward_step
    from parallel.p2p import StageLink
    from parallel.pp_sharding import gather_pipeline_state, stage_state_from_full
    from parallel.sequence_parallel import allreduce_sequence_parallel_grads
    from parallel.tp_sharding import (
        gather_full_grads,
        gather_full_state_dict,
        shard_full_state_dict,
    )

    torch.manual_seed(21)
    model = LLMModel(_config(variant), sequence_parallel=sequence_parallel)
    assert model.sequence_parallel.enabled == sequence_parallel
    if full_state is not None:
        stage = stage_state_from_full(full_state, model)
        model.load_state_dict(shard_full_state_dict(stage, model, ctx.tp_rank, tp), strict=True)
    first, last = model.pre_process, model.post_process
    result = forward_backward(model=model, forward_step=llm_forward_step, data_iter=iter(_batches()),
                              num_micro_batches=MICRO_BATCHES, link=StageLink(ctx.device) if pp > 1 else None,
                              optimizer=_NoOptimizer(), reads_data=first or last)
    allreduce_sequence_parallel_grads(model.parameters())  # SP norms and qk-norm gains, summed over TP
    out = {"loss": result.loss_sum / MICRO_BATCHES, "last": last, "first": first, "samples": result.samples,
           "grads": gather_pipeline_state(gather_full_grads(model, ctx.tp_group), model, ctx.pp_group),
           "state": gather_pipeline_state(gather_full_state_dict(model, ctx.tp_group), model, ctx.pp_group)}
    if pp == 1:
        with torch.no_grad():
            out["logits"] = model(_batches()[0]["tokens"])
    return out


def _run(tp: int, pp: int, sequence_parallel: bool, full_states: dict | None):
    """Every variant on this layout; at TP=2/PP=1 also with sequence parallelism (`sp/<variant>`)
    and the cross-entropy check, in the same processes."""
    from parallel.context import initialize_parallel

    ctx = initialize_parallel(tp, pp, device="cpu", seed=11)
    variants = ["untied"] if pp > 1 else list(VARIANTS)  # tied embeddings are refused under PP
    out = {v: _run_variant(ctx, v, tp, pp, sequence_parallel, full_states and full_states[v]) for v in variants}
    if tp == 2 and pp == 1:
        out.update({f"sp/{v}": _run_variant(ctx, v, tp, pp, True, full_states[v]) for v in variants})
        out["cross_entropy"] = _vocab_parallel_cross_entropy(ctx)
    return out


def _vocab_parallel_cross_entropy(ctx):
    """masked_mean_loss on this rank's vocabulary slice vs torch's cross_entropy on the full logits."""
    import torch.nn.functional as F

    from models.llm.loss import masked_mean_loss

    gen = torch.Generator().manual_seed(2)
    vocab, padded = 250, 256  # six padding columns on the last rank, masked out of the softmax
    full = torch.randn(7, 3, padded, generator=gen) * 4  # [s, b, V_pad]
    labels = torch.randint(0, vocab, (3, 7), generator=gen)
    mask = (torch.rand(3, 7, generator=gen) > 0.5).float()
    out = {}
    for name, loss_mask in (("masked", mask), ("unmasked", None)):
        shard = full.chunk(2, dim=-1)[ctx.tp_rank].clone().requires_grad_()
        loss = masked_mean_loss(shard, labels, loss_mask, vocab_size=vocab)
        loss.backward()
        reference_logits = full[..., :vocab].clone().requires_grad_()
        per_token = F.cross_entropy(reference_logits.permute(1, 2, 0), labels, reduction="none")
        weights = loss_mask if loss_mask is not None else torch.ones_like(per_token)
        reference = (per_token * weights).sum() / weights.sum()
        reference.backward()
        grad = torch.cat([reference_logits.grad, torch.zeros(7, 3, padded - vocab)], dim=-1).chunk(2, dim=-1)[ctx.tp_rank]
        out[name] = (loss.detach(), reference.detach(), shard.grad, grad)
    return out


@pytest.fixture(scope="module")
def reference():
    return run_ranks(1, _run, 1, 1, False, None)[0]


def _close(got, want, what):
    diff = (got - want).abs().max().item()
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL, msg=lambda m: f"{what}: {m}")
    return diff


def _check(results, reference, variants, prefix=""):
    worst = 0.0
    for variant in variants:
        ref = reference[variant]
        for r in (res[prefix + variant] for res in results):
            if r["last"]:
                worst = max(worst, _close(r["loss"], ref["loss"], f"{variant} loss"))
            if "logits" in r:
                worst = max(worst, _close(r["logits"], ref["logits"], f"{variant} logits"))
            if r["first"]:
                assert r["samples"] == MICRO_BATCHES * ROWS
            assert r["grads"].keys() == ref["grads"].keys()
            for name, grad in ref["grads"].items():
                got = r["grads"][name]
                if got.shape[0] > grad.shape[0]:  # vocabulary padding of another size: no gradient there
                    assert got[grad.shape[0]:].abs().max() == 0, name
                    got = got[: grad.shape[0]]
                worst = max(worst, _close(got, grad, f"{variant} {name}"))
        assert ref["grads"]["decoder.layers.0.mlp.linear_fc1.weight"].abs().sum() > 0
    print(f"{prefix}{','.join(variants)}: max abs difference to TP=1/PP=1 (loss, logits, grads) {worst:.2e}")


def test_tp2_with_and_without_sequence_parallel_matches_single_process(reference):
    results = run_ranks(2, _run, 2, 1, False, {v: reference[v]["state"] for v in VARIANTS})
    _check(results, reference, VARIANTS)
    _check(results, reference, VARIANTS, prefix="sp/")
    assert reference["tied_qknorm"]["grads"]["decoder.layers.1.self_attention.q_layernorm.weight"].abs().sum() > 0
    for r in results:
        for loss, want, grad, want_grad in r["cross_entropy"].values():
            torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-6)


def test_pp2_matches_single_process(reference):
    _check(run_ranks(2, _run, 1, 2, False, {"untied": reference["untied"]["state"]}), reference, ["untied"])


def test_tp2_pp2_with_sequence_parallel_matches_single_process(reference):
    _check(run_ranks(4, _run, 2, 2, True, {"untied": reference["untied"]["state"]}), reference, ["untied"])
