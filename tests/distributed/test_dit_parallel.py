"""The DiT at TP=2, at PP=2 and at TP=2 with sequence parallelism equals the single-process model with
the same weights, data, noise and micro-batches (fp32, 1e-5 absolute and relative): the summed
loss, the running metrics and every gradient, the replicated conditioning parameters included
(timestep MLP, adaLN modulation, final modulation, null condition), which must also be identical on
every TP rank. The models run through the engine's schedule with the family's forward_step (noise,
condition dropout and the contrastive term drawn on the first stage and sent along), and the
reference has its adaLN gates perturbed away from zero so every branch carries a gradient.

How the conditioning stays in sync: under PP the first stage computes the conditioning vector and
sends it in the pipeline message (its gradient comes back the same way), so the timestep MLP exists
once; under SP the modulation's partial gradients are summed over TP (`sequence_parallel`) and the
vector enters the sequence-parallel region through megatron's copy-to-TP-region (gradient
all-reduced), see models/dit/layer.py and model.py.
"""
import pytest
import torch

from tests.distributed.harness import run_ranks

TOL = 1e-5
MICRO_BATCHES, ROWS = 4, 2
CASES = {  # name: (tp, pp, sequence parallel, token layout, patch grid)
    "tp2_concat": (2, 1, False, "concat", (2, 3)),
    "pp2": (1, 2, False, "add", (2, 3)),
    "tp2_sp_padded": (2, 1, True, "add", (1, 3)),  # 3 tokens: padded to 4 and masked under SP
}


def _config(layout: str, grid):
    from models.dit.config import DiTConfig, FlowMatchingConfig

    return DiTConfig(condition_dim=12, condition_grid=list(grid), num_layers=4, hidden_size=32, ffn_hidden_size=64,
                     num_attention_heads=4, timestep_frequency_dim=16, adapter_hidden_size=24, clip_width=16,
                     output_dim=8, token_layout=layout,
                     flow=FlowMatchingConfig(condition_dropout=0.5, use_contrastive_loss=True))


def _run_case(ctx, case: str, full_state):
    from functools import partial

    from engine.schedules import forward_backward
    from models.dit.family import dit_forward_step
    from models.dit.flow import FlowPath, NoiseSource
    from models.dit.model import GlobalDiT
    from parallel.p2p import StageLink
    from parallel.pp_sharding import gather_pipeline_state, stage_state_from_full
    from parallel.sequence_parallel import allreduce_sequence_parallel_grads
    from parallel.tp_sharding import gather_full_grads, gather_full_state_dict, shard_full_state_dict

    tp, pp, sp, layout, grid = CASES[case]
    cfg = _config(layout, grid)
    torch.manual_seed(0)
    model = GlobalDiT(cfg, sequence_parallel=sp and ctx.dims.tp > 1)
    if full_state is None:  # the reference: gates away from zero, so attention and MLP get gradients
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "modulation" in name:
                    param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    else:
        stage = stage_state_from_full(full_state, model)
        model.load_state_dict(shard_full_state_dict(stage, model, ctx.tp_rank, ctx.dims.tp), strict=True)
    gen = torch.Generator().manual_seed(2)
    batches = [{"condition": torch.randn(ROWS, cfg.num_patches, cfg.condition_dim, generator=gen),
                "target": 3 * torch.randn(ROWS, cfg.output_dim, generator=gen)} for _ in range(MICRO_BATCHES)]
    noise = NoiseSource(5, ctx.dp_rank) if model.pre_process else None
    step = partial(dit_forward_step, cfg.flow, FlowPath(cfg.flow.sigma_min, cfg.flow.sigma_max), noise, ctx.dp_group,
                   ctx.device)
    no_optimizer = type("NoOpt", (), {"prepare_backward": lambda self, last_micro_batch: None})()
    result = forward_backward(model=model, forward_step=step, data_iter=iter(batches), num_micro_batches=MICRO_BATCHES,
                              link=StageLink(ctx.device) if ctx.dims.pp > 1 else None, optimizer=no_optimizer)
    allreduce_sequence_parallel_grads(list(model.parameters()))  # what the optimizer does first
    replicated = {n: p.grad.clone() for n, p in model.named_parameters()
                  if p.grad is not None and not getattr(p, "tensor_model_parallel", False)}
    grads = gather_full_grads(model, ctx.tp_group)
    return {"loss": result.loss_sum.clone(), "metrics": {k: float(v) for k, v in result.metric_sums.items()},
            "last": model.post_process, "tp_rank": ctx.tp_rank,
            "grads": gather_pipeline_state(grads, model, ctx.pp_group),
            "replicated": gather_pipeline_state(replicated, model, ctx.pp_group),
            "state": gather_pipeline_state(gather_full_state_dict(model, ctx.tp_group), model, ctx.pp_group)}


def _run(cases, tp: int, pp: int, full_states):
    from parallel.context import initialize_parallel

    ctx = initialize_parallel(tp, pp, device="cpu", seed=11)
    return {case: _run_case(ctx, case, full_states[case] if full_states else None) for case in cases}


@pytest.fixture(scope="module")
def references():
    return run_ranks(1, _run, list(CASES), 1, 1, None)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_dit_layout_matches_single_process(references, case):
    tp, pp = CASES[case][:2]
    ref = references[case]
    results = [r[case] for r in run_ranks(tp * pp, _run, [case], tp, pp, {case: ref["state"]})]
    for r in results:
        if r["last"]:
            torch.testing.assert_close(r["loss"], ref["loss"], atol=TOL, rtol=TOL)
            for name, value in ref["metrics"].items():
                assert r["metrics"][name] == pytest.approx(value, abs=TOL, rel=TOL), name
        assert r["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(r["grads"][name], grad, atol=TOL, rtol=TOL, msg=lambda m: f"{case} {name}: {m}")
    # The replicated conditioning parameters: the reference's gradient, bit-identical on every TP rank.
    conditioning = [n for n in ref["grads"] if n.startswith("timestep.") or "modulation" in n or n == "null_condition"]
    assert any(n.startswith("timestep.") for n in conditioning) and any("adaLN" in n for n in conditioning)
    for name in conditioning:
        assert ref["grads"][name].abs().sum() > 0, name
        copies = list({r["tp_rank"]: r["replicated"][name] for r in results}.values())  # one per TP rank
        assert len(copies) == tp, name
        for copy in copies:
            assert torch.equal(copy, copies[0]), name
            torch.testing.assert_close(copy, ref["grads"][name], atol=TOL, rtol=TOL)
    assert ref["grads"]["block.layers.0.self_attention.linear_qkv.weight"].abs().sum() > 0
