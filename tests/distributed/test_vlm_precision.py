"""The VLM under the engine's low-precision modes against fp32 on the same initial weights and data.

Built as the family builds it (`precision.transformer_overrides()`: megatron-core's bf16/fp16 flags
and params_dtype for the tower, the connector and the LLM), every part trainable, 12 steps of
AdamW on four fixed micro-batches (one of them text-only) at lr 2e-3: the loss on the first
micro-batch falls from 4.14 to 3.27 by its third pass (step 9; fp32, measured).

- BF16 O2: every parameter bf16, fp32 master weights and fp32 gradient accumulation
  (`main_grad`), a finite loss within 0.5% of the fp32 run's at every step. Measured: at most 0.10%
  (step 12; 1e-6 at step 1, where only the bf16 forward differs). bf16 keeps 8 mantissa bits, ~4e-3 relative per
  operand; a broken O2 path (updates lost to bf16 rounding, grads not unscaled, master weights not
  copied back) drifts by far more or stops the loss from falling.
- FP16 O2 with the dynamic loss scaler (ZeRO-1 `distributed_fused_adam`): fp16 parameters, fp32
  master weights, no step skipped at an initial scale of 2**12, within 0.5% of fp32 (measured at most
  0.016%). Started at 2**20 the scaled gradients overflow fp16: the first steps are skipped with the
  weights untouched, the scale halves (hysteresis 1) until steps go through (at 2**15, measured), and
  the run still learns.
"""
import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.vlm_fixtures import conversation_batches, tiny_vlm_config

STEPS = 12
TOL = 5e-3  # relative, per step (measured at most: bf16 1.0e-3, fp16 1.6e-4)


def _run(ctx, precision: str, o2: bool, optimizer_name: str, full_state: dict | None,
         initial_scale: float = 2.0**12):
    from engine.loss_scaler import LossScalerConfig
    from engine.optim import build_optimizer
    from engine.precision import plan_precision
    from engine.schema import OptimConfig
    from models.vlm.model import VLMModel, vlm_forward_step

    plan = plan_precision(precision, o2, ctx.device)
    cfg = tiny_vlm_config("mlp")
    cfg.megatron_amp_O2 = o2
    model = VLMModel(cfg, use_cpu_initialization=True, **plan.transformer_overrides())
    if full_state is not None:
        model.load_state_dict(full_state)  # the fp32 run's initial weights, rounded to this dtype
    initial = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    opt = build_optimizer(model, OptimConfig(name=optimizer_name, lr=2e-3, weight_decay=0.0), dp_group=ctx.dp_group,
                          model_parallel_group=ctx.model_parallel_group, max_grad_norm=1.0,
                          master_weights=plan.needs_master_weights,
                          loss_scaler=plan.loss_scaler(LossScalerConfig(initial_scale=initial_scale, hysteresis=1)))
    batches = conversation_batches(model.image_tokens, num_micro_batches=4, rows=2, text_only=(2,))
    losses, skipped, scales = [], [], []
    first_weights_after_skip = None
    for step in range(STEPS):
        opt.zero_grad()
        loss, _ = vlm_forward_step(model, batches[step % len(batches)], None)
        scales.append(opt.loss_scale)
        (loss * opt.loss_scale).backward()
        result = opt.step()
        skipped.append(result.skipped)
        losses.append(loss.item())
        if step == 0 and result.skipped:
            first_weights_after_skip = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    master_dtype = opt.master_chunks[0].dtype if hasattr(opt, "master_chunks") else None
    return {"losses": losses, "skipped": skipped, "scales": scales, "initial": initial,
            "param_dtypes": {p.dtype for p in model.parameters()}, "master_dtype": master_dtype,
            "main_grad_dtypes": {p.main_grad.dtype for p in model.parameters() if hasattr(p, "main_grad")},
            "unchanged_after_skip": None if first_weights_after_skip is None else all(
                torch.equal(first_weights_after_skip[k], initial[k]) for k in initial)}


RUNS = {"bf16": ("bf16", True, "adamw"), "fp16": ("fp16", True, "distributed_fused_adam"),
        "fp16_overflow": ("fp16", True, "distributed_fused_adam", 2.0**20)}


def _all_runs():
    """fp32, then each low-precision run from its initial weights, in one process."""
    from parallel.context import initialize_parallel

    ctx = initialize_parallel(1, 1, device="cpu", seed=5)
    fp32 = _run(ctx, "fp32", False, "adamw", None)
    return {"fp32": fp32, **{name: _run(ctx, *RUNS[name][:3], fp32["initial"], *RUNS[name][3:]) for name in RUNS}}


@pytest.fixture(scope="module")
def runs():
    return run_ranks(1, _all_runs)[0]


def _relative(res, ref):
    got, want = torch.tensor(res["losses"]), torch.tensor(ref["losses"])
    return ((got - want).abs() / want).max().item()


def test_bf16_o2_keeps_fp32_master_weights_and_tracks_fp32(runs):
    res, fp32_run = runs["bf16"], runs["fp32"]
    assert res["param_dtypes"] == {torch.bfloat16}
    assert res["master_dtype"] == torch.float32 and res["main_grad_dtypes"] == {torch.float32}
    assert all(torch.isfinite(torch.tensor(res["losses"])))
    ref = fp32_run["losses"]
    assert ref[8] < 0.85 * ref[0]  # the run learns: the first micro-batch again at step 9 (4.14 -> 3.27)
    assert _relative(res, fp32_run) < TOL, (res["losses"], ref)


def test_fp16_o2_with_the_dynamic_loss_scaler_tracks_fp32(runs):
    res, fp32_run = runs["fp16"], runs["fp32"]
    assert res["param_dtypes"] == {torch.float16} and res["master_dtype"] == torch.float32
    assert not any(res["skipped"])  # 2**12 leaves room on this model
    assert _relative(res, fp32_run) < TOL, (res["losses"], fp32_run["losses"])


def test_fp16_overflow_skips_steps_and_backs_off(runs):
    res = runs["fp16_overflow"]
    skipped, scales = res["skipped"], res["scales"]
    assert skipped[0] and res["unchanged_after_skip"]  # an overflowing step changes no weight
    assert not all(skipped) and not skipped[-1]  # the scale came down far enough
    first_ok = skipped.index(False)
    assert scales[first_ok] < scales[0] and all(s == scales[0] / 2 ** i for i, s in enumerate(scales[:first_ok + 1]))
    assert all(torch.isfinite(torch.tensor(res["losses"])))
    assert res["losses"][first_ok + 4] < 0.95 * res["losses"][first_ok]  # the same micro-batch, 4 steps on
