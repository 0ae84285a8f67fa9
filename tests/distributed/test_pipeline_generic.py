"""The pipeline schedule knows no CLIP: a plain regression model on one megatron `TransformerBlock`
(the shape of the DiT and the VLM's LLM: embed -> layers -> head) pipelines through the same
`forward_backward`, and PP=2 equals PP=1 with the same micro-batches (fp32, 1e-5)."""
import torch

from tests.distributed.harness import run_ranks

TOL = 1e-5
MICRO_BATCHES, ROWS, SEQ, WIDTH = 3, 2, 5, 32


def _run(pp: int, full_state: dict | None):
    from megatron.core import parallel_state

    from engine.schedules import forward_backward
    from models.common.spec import transformer_layer_spec
    from models.common.stage import build_block
    from models.common.transformer_config import make_transformer_config
    from parallel.context import initialize_parallel
    from parallel.p2p import StageLink
    from parallel.pp_sharding import gather_pipeline_state, stage_state_from_full

    ctx = initialize_parallel(1, pp, device="cpu", seed=3)
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()

    class Regressor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config = make_transformer_config(num_layers=4, hidden_size=WIDTH, ffn_hidden_size=64, num_attention_heads=4,
                                             tensor_model_parallel_size=1, pipeline_model_parallel_size=pp)
            self.embed = torch.nn.Linear(8, WIDTH) if first else None
            self.block = build_block(config, transformer_layer_spec("sdpa", causal=True), post_process=last)
            self.head = torch.nn.Linear(WIDTH, 1) if last else None

    model = Regressor()
    if full_state is not None:
        model.load_state_dict(stage_state_from_full(full_state, model))

    def forward_step(model, batch, inputs):
        x = model.embed(batch["x"]).transpose(0, 1) if first else inputs["hidden"]
        x = model.block(x, attention_mask=None)
        if not last:
            return {"hidden": x}, {"samples": ROWS if first else 0, "tokens": 0}
        return torch.nn.functional.mse_loss(model.head(x).squeeze(-1).transpose(0, 1), batch["y"]), \
            {"samples": ROWS if first else 0, "tokens": 0}

    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(MICRO_BATCHES, ROWS, SEQ, 8, generator=gen)
    targets = torch.randn(MICRO_BATCHES, ROWS, SEQ, generator=gen)
    # The first stage reads the inputs and the last the targets (as an LLM's labels), from one iterator.
    batches = iter([{"x": x, "y": y} for x, y in zip(inputs, targets)])
    result = forward_backward(model=model, forward_step=forward_step, data_iter=batches, reads_data=first or last,
                              num_micro_batches=MICRO_BATCHES, link=StageLink(ctx.device) if pp > 1 else None,
                              optimizer=type("NoOpt", (), {"prepare_backward": lambda self, last_micro_batch: None})())
    grads = {k: p.grad for k, p in model.named_parameters()}
    return {"loss": result.loss_sum, "last": last,
            "grads": gather_pipeline_state(grads, model, ctx.pp_group),
            "state": gather_pipeline_state(model.state_dict(), model, ctx.pp_group)}


def test_generic_block_model_pp2_matches_pp1():
    ref = run_ranks(1, _run, 1, None)[0]
    results = run_ranks(2, _run, 2, ref["state"])
    torch.testing.assert_close([r for r in results if r["last"]][0]["loss"], ref["loss"], atol=TOL, rtol=TOL)
    for r in results:
        assert r["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(r["grads"][name], grad, atol=TOL, rtol=TOL, msg=lambda m: f"{name}: {m}")
