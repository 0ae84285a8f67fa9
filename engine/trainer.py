"""A step-based training loop that any model family plugs into through `forward_step`.

`forward_step(model, batch, inputs) -> (loss or message, {"samples": n, "tokens": n[, "flops": f]})` is the only
model-specific piece (see `engine.schedules`); gradient accumulation and the pipeline schedule, DP
averaging, clipping, the optimizer and LR schedule, non-finite steps, logging and evaluation are
the same for CLIP, the DiT and the VLM.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.layout import accumulation_steps
from engine.loss_scaler import DynamicLossScaler
from engine.progress import ProgressLogger
from engine.schedules import forward_backward
from engine.throughput import ThroughputMeter
from parallel.timeouts import names_collective_timeouts

log = logging.getLogger("engine")

MAX_CONSECUTIVE_SKIPS = 10  # non-finite steps in a row (no loss scaler) before training stops


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0  # consecutive
    total_skipped: int = 0
    history: list = field(default_factory=list)  # (step, loss) of every logged step


class Trainer:
    def __init__(self, cfg, ctx, model, optimizer, scheduler, forward_step, *, eval_fn=None, precision=None,
                 link=None, train_loader=None, checkpoint=None, flops_per_sample=None, train_metrics=(),
                 describe_train_metrics=None, after_step=None, stop_requested=None):
        """`cfg` is a `TrainerConfig`; `ctx` the `ParallelContext`; `model` this rank's pipeline stage;
        `forward_step` see `engine.schedules`; `optimizer` a `ReplicatedAdamW` or `FlatAdamW` (it
        syncs, clips and steps); `eval_fn(step) -> metrics`; `precision` a `PrecisionPlan` (autocast
        context for the forward pass); `link` the `StageLink` to the neighbouring stages (PP > 1);
        `train_loader` the micro-batches this stage reads (None: it reads none, it gets activations);
        `checkpoint` an `engine.checkpoint.CheckpointManager` (resume, interval and final saves,
        preemption), or None; `flops_per_sample` the model family's training FLOPs per sample
        (`engine.flops`), for TFLOP/s and MFU in the progress line (None: not shown).
        `train_metrics`: names of the scalars `forward_step` reports in info["metrics"] on the last
        stage, averaged like the loss; `describe_train_metrics` formats them for the progress log;
        `after_step(step, skipped)` runs after every optimizer and LR-schedule step,
        `stop_requested() -> reason | None` after every step's evaluation (see
        `engine.family.TrainingParts`)."""
        self.cfg, self.ctx, self.model = cfg, ctx, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.forward_step, self.eval_fn, self.precision, self.link = forward_step, eval_fn, precision, link
        self.train_loader, self.checkpoint = train_loader, checkpoint
        self.accum = accumulation_steps(cfg.global_batch_size, cfg.micro_batch_size, ctx.dims.dp)
        self.state = TrainState()
        self.train_metrics = tuple(train_metrics)
        self.progress = ProgressLogger(cfg.max_steps, f"{cfg.output_dir}/tensorboard", ctx.is_logging_rank,
                                       extra=self.train_metrics, describe_extra=describe_train_metrics)
        self.preempted = False  # fit stopped early on SIGTERM/SIGUSR1 (after saving)
        self.flops_per_sample = flops_per_sample
        self.after_step, self.stop_requested = after_step, stop_requested
        self.stop_reason: str | None = None  # fit stopped early at the family's request (after saving)

    @property
    def reads_data(self) -> bool:
        """Whether this stage takes micro-batches from the data iterator (see engine.schedules)."""
        return self.train_loader is not None

    def train_step(self, data_iter) -> dict:
        """One optimizer step over `accum` micro-batches (1F1B over the pipeline stages when PP > 1)."""
        self.model.train()
        self.optimizer.zero_grad()
        scale = self.optimizer.loss_scale
        autocast = (lambda: self.precision.autocast(self.ctx.device)) if self.precision else None
        run = forward_backward(model=self.model, forward_step=self.forward_step, data_iter=data_iter,
                               num_micro_batches=self.accum, link=self.link, optimizer=self.optimizer,
                               loss_scale=scale, autocast=autocast, reads_data=self.reads_data)
        result = self.optimizer.step()  # DP gradient sync, unscale, inf check, clip, update
        if result.skipped:
            self._skip_nonfinite(result.grad_norm)
        else:
            self.state.skipped_steps = 0
        self.scheduler.step()
        if self.after_step is not None:  # e.g. clamp a learned temperature, advance the family's clock
            self.after_step(self.state.step + 1, result.skipped)
        # The loss lives on the last pipeline stage, the sample counts on the first.
        totals = torch.tensor([0.0, run.samples, run.tokens, run.bubble_fraction, run.flops]
                              + [0.0] * len(self.train_metrics), dtype=torch.float64, device=run.loss_sum.device)
        totals[0] = run.loss_sum.double() / self.accum
        for i, name in enumerate(self.train_metrics):
            totals[5 + i] = run.metric_sums.get(name, 0.0) / self.accum
        if self.link is not None:
            dist.all_reduce(totals, group=self.ctx.pp_group)
        dist.all_reduce(totals, group=self.ctx.dp_group)
        dp, pp = self.ctx.dims.dp, self.ctx.dims.pp
        metrics = {"loss": totals[0].item() / dp, "grad_norm": result.grad_norm, "lr": self.scheduler.lr,
                   "loss_scale": scale, "samples": int(totals[1].item()), "tokens": int(totals[2].item()),
                   "flops": totals[4].item()}
        if self.link is not None:  # idle share of the schedule, averaged over stages and replicas
            metrics["pipeline_bubble"] = totals[3].item() / (dp * pp)
        for i, name in enumerate(self.train_metrics):  # last stage only, so summing over stages keeps it
            metrics[name] = totals[5 + i].item() / dp
        return metrics

    def _skip_nonfinite(self, grad_norm: float) -> None:
        self.state.skipped_steps += 1
        self.state.total_skipped += 1
        scaler = self.optimizer.loss_scaler
        dynamic = isinstance(scaler, DynamicLossScaler)  # fp16 only: bf16 and fp32 have no loss scale
        log.warning("step %d: non-finite gradients (norm %s); update skipped on every rank (%d in a row, %d in "
                    "all%s)", self.state.step + 1, grad_norm, self.state.skipped_steps, self.state.total_skipped,
                    f"; loss scale now {scaler.scale:g}" if dynamic else "")
        # A dynamic scaler skips while it searches for its scale; it is stuck only at its floor.
        stuck = dynamic and scaler.scale <= scaler.cfg.min_scale
        limit_reached = not dynamic and self.state.skipped_steps >= MAX_CONSECUTIVE_SKIPS
        if stuck or limit_reached:
            where = f"; {self.checkpoint.healthy_checkpoint_note()}" if self.checkpoint is not None else ""
            advice = "lower optim.lr or check the data"
            if dynamic:  # fp16's range is what overflows; bf16 has fp32's exponent range
                advice = "lower optim.lr, check the data, or use trainer.precision=bf16"
            raise FloatingPointError(
                f"training stopped at step {self.state.step + 1}: {self.state.skipped_steps} consecutive steps "
                f"with non-finite gradients{' at the minimum loss scale' if stuck else ''}; {advice}{where}"
            )

    @names_collective_timeouts(lambda self, *args, **kwargs: f"the last completed training step was {self.state.step}")
    def fit(self, data_iter=None) -> dict:
        """Train to `max_steps`, evaluating every `val_check_interval` steps and at the end (after the
        final checkpoint). `data_iter` defaults to the train loader's batches (after resume has
        restored its position)."""
        cfg, last_eval, ckpt = self.cfg, {}, self.checkpoint
        if ckpt is not None:
            ckpt.resume(self)  # step, weights, optimizer, schedule, RNG and data position
        if data_iter is None:
            data_iter = iter(self.train_loader) if self.reads_data else NoDataOnThisStage(self.ctx.pp_rank)
        log.info("training %d steps: global batch %d = micro %d x DP %d x accumulation %d",
                 cfg.max_steps, cfg.global_batch_size, cfg.micro_batch_size, self.ctx.dims.dp, self.accum)
        dims = self.ctx.dims
        throughput = ThroughputMeter(self.flops_per_sample, dims.tp * dims.pp * dims.dp, self.ctx.device,
                                     getattr(cfg, "peak_tflops", None), warn=self.ctx.is_logging_rank)
        window_start, window_samples, window_tokens, window_flops = time.time(), 0, 0, 0.0
        while self.state.step < cfg.max_steps:
            metrics = self.train_step(data_iter)
            self.state.step += 1
            self.state.samples_seen += metrics["samples"]
            window_samples += metrics["samples"]
            window_tokens += metrics["tokens"]
            window_flops += metrics.pop("flops")
            step = self.state.step
            if step % cfg.log_every_n_steps == 0 or step == cfg.max_steps:
                elapsed = time.time() - window_start
                steps_in_window = (step - 1) % cfg.log_every_n_steps + 1
                metrics.update(samples_per_s=window_samples / elapsed, tokens_per_s=window_tokens / elapsed,
                               step_time=elapsed / steps_in_window)
                # TFLOP/s, MFU, peak memory; the FLOPs forward_step counted, when it did
                metrics.update(throughput.metrics(metrics["samples_per_s"], window_flops / elapsed or None))
                self.state.history.append((step, metrics["loss"]))
                self.progress.log_train(step, metrics)
                window_start, window_samples, window_tokens, window_flops = time.time(), 0, 0, 0.0
            at_interval = cfg.val_check_interval > 0 and step % cfg.val_check_interval == 0
            if self.eval_fn is not None and at_interval and step < cfg.max_steps:  # the last one: after saving
                last_eval = self.eval_fn(step)
                self.progress.log_eval(step, last_eval)
                window_start = time.time()  # evaluation time is not training throughput
            if ckpt is not None:
                if ckpt.after_step(self, loss=metrics["loss"]):  # interval saves; on SIGTERM/SIGUSR1 save and stop
                    self.preempted = True
                    break
                if ckpt.last_saved_step == step:
                    window_start = time.time()  # saving time is not training throughput
            if self.stop_requested is not None and step < cfg.max_steps:
                self.stop_reason = self._agreed_stop_reason()
                if self.stop_reason is not None:
                    if ckpt is not None:
                        path = ckpt.save(self, reason="stop")
                        ckpt.wait()
                    log.info("training stops at step %d of %d: %s%s", step, cfg.max_steps, self.stop_reason,
                             f"; checkpoint {path}" if ckpt is not None else "")
                    break
        if ckpt is not None and not self.preempted:
            ckpt.at_end(self)
        # After the final save, so a failing evaluation cannot cost the checkpoint; a rerun that
        # resumes at max_steps evaluates again.
        if self.eval_fn is not None and not self.preempted:
            last_eval = self.eval_fn(self.state.step)
            self.progress.log_eval(self.state.step, last_eval)
        self.progress.close()
        return last_eval


    def _agreed_stop_reason(self) -> str | None:
        """The family's stop request, agreed over every rank: any rank's request stops them all (a
        decision one rank alone took would leave the others waiting in the next step's collectives)."""
        reason = self.stop_requested()
        flag = torch.tensor([1 if reason else 0], dtype=torch.int32, device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not int(flag.item()):
            return None
        reasons = [None] * dist.get_world_size()
        dist.all_gather_object(reasons, reason)
        return next(r for r in reasons if r)


class NoDataOnThisStage:
    """The data iterator of a pipeline stage that reads no data: using it is a schedule bug."""

    def __init__(self, stage: int):
        self.stage = stage

    def __iter__(self):
        return self

    def __next__(self):
        raise RuntimeError(f"pipeline stage {self.stage} reads no data; its model family gave it no train loader")
