"""One run for every model family: config -> layout check -> parallel init -> build -> fit -> final
metrics. A family's entry point is a few lines:

    from engine.run import launch
    if __name__ == "__main__":
        launch("clip", __doc__)
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import warnings

from engine.config import ConfigError, load_config, schema_keys, split_config_arg, to_yaml
from engine.family import ModelFamily, get_family
from engine.schema import BARE_KEYS
from parallel.dims import ParallelLayoutError

log = logging.getLogger("engine")


class RankFilter(logging.Filter):
    """Logs of the logging rank only, so a warning every rank would print appears once. Other ranks
    keep their errors, and records marked `extra={"per_replica": True}` (this replica's own data:
    a corrupt shard only it reads) on the first rank of each data-parallel replica."""

    def __init__(self, rank: int, replica_leader: bool = False):
        super().__init__()
        self.rank, self.replica_leader = rank, replica_leader

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0 or record.levelno >= logging.ERROR:
            return True
        return self.replica_leader and getattr(record, "per_replica", False)


def install_rank_filter(rank: int, replica_leader: bool = False) -> None:
    """Filter every root handler (and Python warnings, routed through logging) by rank."""
    logging.captureWarnings(True)
    root = logging.getLogger()
    for handler in root.handlers:
        for old in [f for f in handler.filters if isinstance(f, RankFilter)]:
            handler.removeFilter(old)
        handler.addFilter(RankFilter(rank, replica_leader))


def _family(family: str | ModelFamily) -> ModelFamily:
    return family if isinstance(family, ModelFamily) else get_family(family)


def load_experiment(family: str | ModelFamily, argv: list[str]):
    """The family's typed config from `--config FILE` and `key=value` overrides in `argv`."""
    family = _family(family)
    config_file, overrides = split_config_arg(argv)
    return load_config(family.config_cls, config_file, overrides, BARE_KEYS, aliases=family.config_aliases)


def check_before_launch(cfg, family: ModelFamily, world_size: int, argv: list[str] | None = None):
    """Everything that can be checked before a process group exists: the layout (every problem at
    once) and the family's own preflight (files, tokenizers). Raises ParallelLayoutError/ConfigError."""
    from engine.layout import validate_layout

    dims = validate_layout(cfg, world_size, family, argv)
    problems = family.preflight(cfg) if family.preflight is not None else []
    if problems:
        raise ConfigError("\n".join(problems))
    return dims


def build_trainer(cfg, ctx, family: str | ModelFamily, lock=None, lock_taken: bool = False):
    """Everything a run needs on this rank around the family's parts: precision, optimizer (with
    the model's weight-decay policy), LR schedule, pipeline link, checkpoints, trainer. `lock_taken`:
    the caller already took the checkpoint directory's lock (collectively, with
    `take_directory_lock`; `lock` is what that returned, None on ranks but 0); else the checkpoint
    manager takes it."""
    from engine.checkpoint import CheckpointManager
    from engine.optim import WarmupCosineSchedule, build_optimizer
    from engine.precision import plan_precision
    from engine.trainer import Trainer
    from parallel.p2p import StageLink

    family = _family(family)
    rss_before_model = current_rss_bytes()
    precision = plan_precision(cfg.trainer.precision, getattr(cfg.model, "megatron_amp_O2", False), ctx.device)
    parts = family.build(cfg, ctx, precision)
    model = parts.model
    optimizer = build_optimizer(model, cfg.optim, dp_group=ctx.dp_group, model_parallel_group=ctx.model_parallel_group,
                                max_grad_norm=cfg.trainer.gradient_clip_val,
                                master_weights=precision.needs_master_weights,
                                loss_scaler=precision.loss_scaler(cfg.trainer.loss_scaler))
    if ctx.is_logging_rank:
        log.info("precision %s%s, optimizer %s (%s), optimizer state %.1f MB on this rank", precision.name,
                 " O2" if precision.o2 else "", cfg.optim.name, type(optimizer).__name__,
                 optimizer.state_bytes() / 2**20)
    sched = cfg.optim.sched
    scheduler = WarmupCosineSchedule(optimizer, cfg.optim.lr, sched.warmup_steps, cfg.trainer.max_steps,
                                     sched.min_lr, sched.name)
    link = StageLink(ctx.device) if ctx.dims.pp > 1 else None
    checkpoint = CheckpointManager(cfg, ctx, family=family.name, extra_state=parts.extra_state,
                                   init_key_map=parts.init_key_map, lock=lock,
                                   lock_taken=lock_taken)
    trainer = Trainer(cfg.trainer, ctx, model, optimizer, scheduler, parts.forward_step, eval_fn=parts.eval_fn,
                      precision=precision, link=link, train_loader=parts.train_loader, checkpoint=checkpoint,
                      flops_per_sample=parts.flops_per_sample, train_metrics=parts.train_metrics,
                      describe_train_metrics=parts.describe_train_metrics, after_step=parts.after_step,
                      stop_requested=parts.stop_requested)
    trainer.parts, trainer.rss_before_model = parts, rss_before_model
    return trainer


def run(family: str | ModelFamily, argv: list[str]) -> dict:
    """Train one experiment of `family` with the command-line arguments `argv`; returns the final
    evaluation metrics (on every rank)."""
    from parallel.context import destroy_parallel, initialize_parallel
    from parallel.launch import read_launch_env

    family = _family(family)
    launch_env = read_launch_env()
    install_rank_filter(launch_env.rank)
    cfg = load_experiment(family, argv)
    check_before_launch(cfg, family, launch_env.world_size, argv)  # before any collective can hang
    par = cfg.parallel
    ctx = initialize_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.device,
                              seed=cfg.trainer.seed, timeout_minutes=par.distributed_timeout_minutes,
                              host_shared_memory=par.host_shared_memory)
    install_rank_filter(ctx.rank, replica_leader=ctx.tp_rank == 0 and ctx.pp_rank == 0)
    try:
        from engine.checkpoint.manager import checkpoint_root, take_directory_lock

        # Before this run writes anything (config.yaml, data, tokenizer): one run per directory.
        lock, trainer = take_directory_lock(checkpoint_root(cfg)), None
        try:
            if ctx.is_logging_rank:
                os.makedirs(cfg.trainer.output_dir, exist_ok=True)
                with open(os.path.join(cfg.trainer.output_dir, "config.yaml"), "w") as fh:
                    fh.write(to_yaml(cfg))
            trainer = build_trainer(cfg, ctx, family, lock=lock, lock_taken=True)
            final = trainer.fit()
            extra = trainer.parts.summary() if trainer.parts.summary is not None else {}
            if ctx.is_logging_rank:
                summary = {"step": trainer.state.step, "samples_seen": trainer.state.samples_seen,
                           "skipped_steps": trainer.state.total_skipped,
                           "rss_before_model_mib": trainer.rss_before_model / 2**20,
                           "peak_rss_mib": peak_rss_bytes() / 2**20, **extra, **final}
                if trainer.stop_reason is not None:
                    summary["stop_reason"] = trainer.stop_reason
                log.info("final: %s", json.dumps(summary))
                with open(os.path.join(cfg.trainer.output_dir, "final_metrics.json"), "w") as fh:
                    json.dump(summary, fh, indent=2)
            return final
        finally:
            if trainer is not None:
                trainer.checkpoint.close()  # waits for an async save, releases the lock
            elif lock is not None:
                lock.release()
    finally:
        destroy_parallel()


def usage(family: ModelFamily, doc: str | None) -> str:
    keys = schema_keys(family.config_cls)
    aliases = "".join(f"\n  {a} -> {k}" for a, k in sorted(family.config_aliases.items()))
    return ((doc or family.description).rstrip() + "\n\nconfig keys (section.key=value):\n  " + "\n  ".join(keys)
            + "\n\nbare keys: " + ", ".join(f"{b} ({k})" for b, k in BARE_KEYS.items())
            + (f"\n\naccepted aliases:{aliases}" if aliases else ""))


def launch(family_name: str, doc: str | None = None, argv: list[str] | None = None) -> None:
    """The `__main__` of examples/pretrain_<family>.py: logging, `--help`, and `error:` with exit
    status 2 for a config or layout that cannot run (before any process group exists)."""
    argv = sys.argv[1:] if argv is None else argv
    quiet_optional_extra_warnings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.WARNING)  # import-time chatter
    faulthandler.enable()  # a rank that dies in a collective shows its stack instead of a silent hang
    family = get_family(family_name)
    if any(a in ("-h", "--help") for a in argv):
        print(usage(family, doc))
        return
    from engine.checkpoint.lock import CheckpointLockError
    from parallel.timeouts import CollectiveTimeoutError

    try:
        run(family, argv)
    except (ConfigError, ParallelLayoutError, CheckpointLockError) as exc:  # nothing ran: fix and relaunch
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except CollectiveTimeoutError as exc:  # another rank stopped answering: say which wait, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def quiet_optional_extra_warnings() -> None:
    """megatron-core warns at import, once per module, that Transformer Engine / Apex are missing;
    the engine says once which attention backend runs instead."""
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
