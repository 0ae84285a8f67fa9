"""Runs of the real CLIP recipe (synthetic data, data pipeline, trainer, checkpoint manager) for the
checkpoint tests: tiny enough for 2 CPU cores, with a shuffle buffer, gradient accumulation and an
epoch boundary inside the run, so an exact resume has to restore all of them."""
from __future__ import annotations

import os
import signal

STEPS = 8
STOP_AT = 4


def recipe_overrides(out_dir: str, shapes_dir: str, tp: int, optimizer: str, steps: int = STEPS) -> list[str]:
    return [
        f"tensor_model_parallel_size={tp}", "device=cpu",
        f"trainer.output_dir={out_dir}", f"data.synthetic.out_dir={shapes_dir}",
        "data.synthetic.num_train=192", "data.synthetic.num_eval=16", "data.synthetic.image_size=32",
        "data.synthetic.samples_per_shard=32", "data.shuffle_buffer=48", "data.tokenizer.vocab_size=200",
        "model.vision.img_h=32", "model.vision.img_w=32", "model.vision.patch_dim=8",
        "model.vision.num_layers=2", "model.text.num_layers=2", "model.text.encoder_seq_length=16",
        "model.vision.hidden_size=64", "model.text.hidden_size=64", "model.output_dim=32",
        "model.vision.ffn_hidden_size=128", "model.text.ffn_hidden_size=128",
        "model.vision.num_attention_heads=4", "model.text.num_attention_heads=4",
        "model.vision.hidden_dropout=0.1", "model.text.attention_dropout=0.1",  # the RNG streams matter
        f"trainer.max_steps={steps}", "trainer.micro_batch_size=8", "trainer.global_batch_size=32",
        "trainer.log_every_n_steps=1", "trainer.val_check_interval=0", "optim.sched.warmup_steps=2",
        f"optim.name={optimizer}", "optim.bucket_size=20000", "optim.lr=2e-3",
        "eval.zero_shot=false", "eval.retrieval=false",
    ]


def run_recipe(overrides: list[str], stop_at: int | None = None):
    """One rank of a training run through `build_trainer` + `fit`; with `stop_at`, rank 0 sends
    itself SIGUSR1 during that step (a preemption). Returns losses, parameters and the manager's view."""
    import torch

    from engine.config import load_config
    from engine.recipes.clip import build_trainer
    from engine.schema import BARE_KEYS, ExperimentConfig
    from parallel.context import initialize_parallel
    from parallel.tp_sharding import gather_full_state_dict

    cfg = load_config(ExperimentConfig, None, overrides, BARE_KEYS)
    par = cfg.parallel
    ctx = initialize_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.device,
                              seed=cfg.trainer.seed)
    trainer, data_iter = build_trainer(cfg, ctx)
    if stop_at is not None:
        step_fn = trainer.forward_step

        def forward_step(*args, **kwargs):
            if trainer.state.step + 1 == stop_at and ctx.rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            return step_fn(*args, **kwargs)

        trainer.forward_step = forward_step
    trainer.fit(data_iter)
    trainer.checkpoint.close()
    params = gather_full_state_dict(trainer.model, ctx.tp_group)
    return {"history": list(trainer.state.history), "step": trainer.state.step, "preempted": trainer.preempted,
            "params": {k: v for k, v in params.items() if torch.is_tensor(v)},
            "samples_seen": trainer.state.samples_seen, "loaded_from": trainer.checkpoint.loaded_from,
            "timings": trainer.checkpoint.timings}
