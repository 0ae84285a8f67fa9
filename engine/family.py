"""The seam between the engine and a model family (CLIP, the LLM, the DiT, the VLM).

A family is one `ModelFamily` value in the registry (`models/registry.py`), as torchtitan keeps one
`TrainSpec` per model: its experiment config class, its layout checks, how it builds one rank's
share of a run (`TrainingParts`: the model of this pipeline stage, `forward_step`, the data it
reads, its evaluation, extra checkpoint state), and what the offline checkpoint tools need (a
TP=1/PP=1 reference model, vocabulary padding). The engine (config loading, layout checks,
parallel init, trainer, schedule, optimizers, checkpoints, progress) only ever sees these; it
imports no family's module.

A new family touches `models/<family>/`, `configs/<family>/`, an `examples/pretrain_<family>.py`
of a few lines (`engine.run.launch("<family>")`), its tests, and one line of `models/registry.py`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass
class TrainingParts:
    """What a family builds on one rank; the engine adds the optimizer, LR schedule, pipeline link,
    checkpoint manager and trainer around it."""

    model: torch.nn.Module  # this rank's pipeline stage, on the run's device and parameter dtype
    forward_step: Callable  # (model, batch, inputs) -> (loss | message, info); see engine.schedules
    # Micro-batches this stage reads (an iterable with state_dict()/load_state_dict() for exact
    # resume), or None on a stage that reads no data (the first stage reads inputs; the last reads
    # labels when its loss needs them, as an LLM's does). Every reading stage of one data-parallel
    # replica must yield the same stream: one copy of its position is checkpointed per replica.
    train_loader: Any = None
    eval_fn: Optional[Callable[[int], dict]] = None  # step -> metrics, collective over every rank
    # name -> object with state_dict()/load_state_dict(), saved in every checkpoint and restored on
    # resume (FastCLIP's per-sample state, say). Its state_dict's values are `engine.checkpoint.Boxes`
    # of a canonical tensor (sharded over ranks; any layout reloads them) or small picklable
    # objects, identical on every rank that holds them.
    extra_state: dict = field(default_factory=dict)
    # Totals for the final log line and final_metrics.json (e.g. skipped shards), collective: every
    # rank calls it once at the end.
    summary: Optional[Callable[[], dict]] = None
    # Training FLOPs of one sample (forward + backward) for TFLOP/s and MFU; None: not reported.
    # When the work per sample varies, forward_step also reports info["flops"] per micro-batch (CLIP's
    # trimmed text tower), and the meter uses those instead.
    flops_per_sample: Optional[float] = None
    # How `checkpoint.init_from` names map onto this model (an engine.checkpoint.KeyMap), e.g.
    # base weights into LoRA-wrapped layers; None: the names must match exactly.
    init_key_map: Any = None
    # Names of scalars `forward_step` returns on the last stage in info["metrics"] (one value per
    # micro-batch, e.g. the DiT's running cosine): averaged over the step's micro-batches and the
    # data-parallel replicas like the loss, logged with it and to TensorBoard.
    train_metrics: tuple = ()
    # metrics dict -> text for the progress log (a quality band, memory); None: "name value" pairs.
    describe_train_metrics: Optional[Callable[[dict], str]] = None
    # (step, skipped) after every optimizer step and LR-schedule step, on every rank: `step` is the
    # number of steps done, `skipped` whether this one's update was skipped (non-finite gradients).
    # E.g. clamp a learned temperature into its range, advance a family's own clock.
    after_step: Optional[Callable[[int, bool], None]] = None
    # () -> a reason to stop (e.g. early stopping on a validation metric), or None; asked after each
    # step's evaluation. The trainer agrees on it over every rank, saves a checkpoint, logs the
    # reason and ends the run normally (exit status 0).
    stop_requested: Optional[Callable[[], Optional[str]]] = None

    @property
    def reads_data(self) -> bool:
        return self.train_loader is not None


@dataclass(frozen=True)
class ModelFamily:
    name: str
    config_cls: type  # an engine.schema.ExperimentConfig subclass with model/data/eval sections
    # (cfg, ctx, precision plan) -> TrainingParts for this rank (collective: every rank calls it)
    build: Callable[..., TrainingParts]
    # (cfg, tp, pp) -> [problem, ...]: model dimensions that TP or PP do not divide, each naming its
    # key. Runs before any process group exists.
    check_layout: Callable[..., list]
    # model_cfg -> the TP=1/PP=1 model (the tools build it on the meta device for its state-dict
    # names and shapes).
    reference_model: Callable[..., torch.nn.Module]
    entry_point: str  # the script users launch, for messages: examples/pretrain_<family>.py
    # (model_cfg, tp) -> rows of the vocab-parallel tensors at that TP (their padding depends on
    # TP), or None for a family without a vocabulary.
    vocab_rows: Optional[Callable[..., int]] = None
    # (cfg) -> [problem, ...] found before any collective (missing files, a tokenizer a run cannot
    # use), so every rank fails at once with `error:` instead of inside a collective.
    preflight: Optional[Callable[..., list]] = None
    # Config paths other tools document (NeMo's, say) -> this family's key; each use is logged.
    config_aliases: dict = field(default_factory=dict)
    description: str = ""


def _registry() -> dict:
    return importlib.import_module("models.registry").FAMILIES


def family_names() -> list[str]:
    return sorted(_registry())


def get_family(name: str) -> ModelFamily:
    """The registered family `name` (imported on first use)."""
    entries = _registry()
    if name not in entries:
        import difflib

        close = difflib.get_close_matches(name, entries, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown model family {name!r} (registered: {', '.join(sorted(entries))}){hint}")
    module_name, _, attr = entries[name].partition(":")
    family = getattr(importlib.import_module(module_name), attr)
    if not isinstance(family, ModelFamily) or family.name != name:
        raise TypeError(f"models.registry: {entries[name]} is not the ModelFamily {name!r}")
    return family


def family_of_config(cfg) -> ModelFamily:
    """The registered family whose experiment config class `cfg` is an instance of."""
    for name in family_names():
        family = get_family(name)
        if type(cfg) is family.config_cls:
            return family
    raise TypeError(f"{type(cfg).__name__} is no registered family's experiment config "
                    f"(registered: {', '.join(family_names())})")
