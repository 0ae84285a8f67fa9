"""The DiT under the engine's memory and precision features: full and selective recompute give the
gradients of the plain run (the conditioning vector travels through megatron's checkpointed
forward as `context`), and BF16 O2 with ZeRO-1 and FP16 O2 with the dynamic loss scaler (the
seed's --fp16) train with finite losses."""
import math

import torch

from tests.distributed.dit_fixtures import tiny_dit_overrides, write_structured_embeddings
from tests.distributed.harness import run_ranks


def _recompute_grads(settings: dict):
    from engine.checkpoint.tools import single_process_parallel_state
    from models.dit.config import DiTConfig
    from models.dit.model import GlobalDiT

    cfg = DiTConfig(condition_dim=12, condition_grid=[2, 3], num_layers=4, hidden_size=32, ffn_hidden_size=64,
                    num_attention_heads=4, timestep_frequency_dim=16, adapter_hidden_size=24, clip_width=16,
                    output_dim=8, **settings)
    with single_process_parallel_state():
        torch.manual_seed(0)
        model = GlobalDiT(cfg)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "modulation" in name:
                    param.normal_(0, 0.2)
        gen = torch.Generator().manual_seed(1)
        v = model(torch.randn(3, 6, 12, generator=gen), torch.randn(3, 8, generator=gen), torch.rand(3, generator=gen))
        v.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_recompute_gives_the_same_gradients():
    plain = _recompute_grads({})
    for settings in ({"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "uniform",
                      "activations_checkpoint_num_layers": 1},
                     {"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "block",
                      "activations_checkpoint_num_layers": 2},
                     {"activations_checkpoint_granularity": "selective"}):
        grads = _recompute_grads(settings)
        assert grads.keys() == plain.keys()
        for name, grad in plain.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-6, msg=lambda m: f"{settings} {name}: {m}")
    assert plain["timestep.mlp.0.weight"].abs().sum() > 0


def _train(argv_sets):
    from engine.run import run

    out = []
    for argv in argv_sets:
        run("dit", argv)
        import json
        import os

        out_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("trainer.output_dir="))
        with open(os.path.join(out_dir, "final_metrics.json")) as fh:
            out.append(json.load(fh))
    return out


def test_bf16_o2_zero1_and_fp16_loss_scaler_train(tmp_path):
    write_structured_embeddings(str(tmp_path / "train"), 128)
    common = tiny_dit_overrides() + [
        "device=cpu", f"data.train_dir={tmp_path / 'train'}", "eval.enabled=false", "trainer.max_steps=3",
        "trainer.micro_batch_size=8", "trainer.global_batch_size=16", "trainer.log_every_n_steps=1",
        "checkpoint.save_at_end=false", "model.megatron_amp_O2=true"]
    runs = [common + ["trainer.precision=bf16", "optim.name=distributed_fused_adam",
                      f"trainer.output_dir={tmp_path / 'bf16'}"],
            common + ["trainer.precision=fp16", "trainer.loss_scaler.initial_scale=1024",
                      f"trainer.output_dir={tmp_path / 'fp16'}"]]
    results = run_ranks(1, _train, runs)[0]
    for summary in results:
        assert summary["step"] == 3 and summary["skipped_steps"] == 0, summary
    for directory in ("bf16", "fp16"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / directory / "tensorboard"))
        events.Reload()
        losses = [e.value for e in events.Scalars("train/loss")]
        cosines = [e.value for e in events.Scalars("train/cosine")]
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses + cosines), directory
