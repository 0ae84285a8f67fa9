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
    from engine.run import build_trainer
    from engine.schema import BARE_KEYS
    from models.clip.config import CLIPExperimentConfig as ExperimentConfig
    from parallel.context import initialize_parallel
    from parallel.tp_sharding import gather_full_state_dict

    cfg = load_config(ExperimentConfig, None, overrides, BARE_KEYS)
    par = cfg.parallel
    ctx = initialize_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.device,
                              seed=cfg.trainer.seed)
    trainer = build_trainer(cfg, ctx, "clip")
    if stop_at is not None:
        step_fn = trainer.forward_step

        def forward_step(*args, **kwargs):
            if trainer.state.step + 1 == stop_at and ctx.rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            return step_fn(*args, **kwargs)

        trainer.forward_step = forward_step
    trainer.fit()
    trainer.checkpoint.close()
    params = gather_full_state_dict(trainer.model, ctx.tp_group)
    return {"history": list(trainer.state.history), "step": trainer.state.step, "preempted": trainer.preempted,
            "params": {k: v for k, v in params.items() if torch.is_tensor(v)},
            "samples_seen": trainer.state.samples_seen, "loaded_from": trainer.checkpoint.loaded_from,
            "timings": trainer.checkpoint.timings}


# -- re-sharding: fixed batches, any layout ---------------------------------------------------------
GLOBAL_BATCH = 16


def fixed_batches(cfg, dp_rank: int, dp_size: int, first_step: int):
    """This DP rank's micro-batch of a fixed global batch per step (one micro-batch per step, so the
    contrastive problem is the whole global batch at every DP size)."""
    import torch

    step = first_step
    micro = GLOBAL_BATCH // dp_size
    while True:
        gen = torch.Generator().manual_seed(1000 + step)
        vocab, seq = cfg.model.text.vocab_size, cfg.model.text.encoder_seq_length
        images = torch.randn(GLOBAL_BATCH, 3, cfg.model.vision.img_h, cfg.model.vision.img_w, generator=gen)
        tokens = torch.randint(1, vocab - 1, (GLOBAL_BATCH, seq), generator=gen)
        tokens[torch.arange(GLOBAL_BATCH), torch.randint(3, seq, (GLOBAL_BATCH,), generator=gen)] = vocab - 1
        rows = slice(dp_rank * micro, (dp_rank + 1) * micro)
        yield {"images": images[rows], "tokens": tokens[rows]}
        step += 1


def reshard_overrides(shapes_dir: str, tp: int, pp: int, world: int, optimizer: str) -> list[str]:
    dp = world // (tp * pp)
    keep = [o for o in recipe_overrides("unused", shapes_dir, tp, optimizer) if not o.startswith(
        ("trainer.micro_batch_size", "trainer.global_batch_size", "model.vision.hidden_dropout",
         "model.text.attention_dropout", "trainer.output_dir", "model.vision.num_layers", "model.text.num_layers"))]
    return keep + [f"pipeline_model_parallel_size={pp}", f"trainer.micro_batch_size={GLOBAL_BATCH // dp}",
                   f"trainer.global_batch_size={GLOBAL_BATCH}", "model.vision.num_layers=4", "model.text.num_layers=4"]


def run_layout(overrides: list[str], out_dir: str, resume: str | None, train_before: int, train_after: int,
               batch_step: int | None = None):
    """Build the recipe at a layout; optionally load `resume`; train `train_before` steps; save into
    `out_dir`/checkpoints; train `train_after` more steps. Returns the losses and the saved path.
    Batches follow the step count (or start at `batch_step`)."""
    from engine.config import load_config
    from engine.run import build_trainer
    from engine.schema import BARE_KEYS
    from models.clip.config import CLIPExperimentConfig as ExperimentConfig
    from parallel.context import initialize_parallel

    overrides = overrides + [f"trainer.output_dir={out_dir}", f"checkpoint.resume={resume or 'none'}"]
    cfg = load_config(ExperimentConfig, None, overrides, BARE_KEYS)
    par = cfg.parallel
    ctx = initialize_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.device,
                              seed=cfg.trainer.seed)
    trainer = build_trainer(cfg, ctx, "clip")
    manager = trainer.checkpoint
    manager.resume(trainer)
    batches = fixed_batches(cfg, ctx.dp_rank, ctx.dims.dp, trainer.state.step if batch_step is None else batch_step)
    losses = []

    def train(n):
        for _ in range(n):
            metrics = trainer.train_step(batches)
            trainer.state.step += 1
            losses.append(metrics["loss"])

    train(train_before)
    path = manager.save(trainer)
    train(train_after)
    manager.close()
    return {"losses": losses, "saved": path, "step": trainer.state.step, "adam_step": trainer.optimizer.checkpoint_step}


# -- crashes during a save ------------------------------------------------------------------------
CRASH_EXIT = 17


def crash_run(overrides: list[str], crash: str | None, crash_step: int):
    """A recipe run that dies (os._exit, no cleanup, like a kill -9) inside the save of `crash_step`:
    - rank1_mid_write: rank 1 after writing a few of its tensors (its data file is partial)
    - rank0_before_rename: rank 0 after every file and the COMPLETE marker, before the rename
    - rank0_before_latest: rank 0 after the rename, before `latest` is moved
    """
    import types

    import torch.distributed as dist

    from engine.checkpoint import manager as manager_mod
    from engine.checkpoint import storage

    target = storage.step_dirname(crash_step)

    def rank():
        return dist.get_rank() if dist.is_initialized() else 0

    if crash == "rank1_mid_write":
        writing = {"path": ""}
        write_state, resolve = manager_mod.write_state, storage._SavePlanner.resolve_data
        count = [0]

        def tracking_write_state(path, *args, **kwargs):
            writing["path"] = path
            return write_state(path, *args, **kwargs)

        def dying_resolve(self, item):
            if rank() == 1 and target in writing["path"]:
                count[0] += 1
                if count[0] == 6:
                    os._exit(CRASH_EXIT)
            return resolve(self, item)

        manager_mod.write_state = tracking_write_state
        storage._SavePlanner.resolve_data = dying_resolve
    elif crash == "rank0_before_rename":
        real_os = storage.os
        fake = types.ModuleType("os")
        fake.__dict__.update(real_os.__dict__)

        def rename(src, dst):
            if rank() == 0 and os.path.basename(dst) == target:
                os._exit(CRASH_EXIT)
            return real_os.rename(src, dst)

        fake.rename = rename
        storage.os = fake
    elif crash == "rank0_before_latest":
        update_latest = storage.update_latest

        def dying_update(root, name):
            if rank() == 0 and name == target:
                os._exit(CRASH_EXIT)
            return update_latest(root, name)

        storage.update_latest = dying_update
    return run_recipe(overrides)
