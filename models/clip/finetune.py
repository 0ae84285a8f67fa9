"""CLIP fine-tuning scenarios: which parameters train, and the LoRA they get (the seed's ablations).

| scenario | trains |
|---|---|
| zero_shot | nothing (evaluation only) |
| linear_probe | the two projections (`visual.proj`, `text.text_projection`) |
| lora_dual (default) | LoRA in both towers + both projections |
| lora_vision | LoRA in the image tower + its projection |
| lora_text | LoRA in the text tower + its projection |
| full | every parameter |

The temperature (`logit_scale`) trains only in `full`, unless `train_logit_scale` says otherwise
(the seed fine-tunes a PEFT-wrapped Hugging Face CLIP, whose scale is frozen).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from models.common.lora import (
    LoRAConfig,
    apply_lora,
    count_parameters,
    is_lora_key,
    set_trainable_,
)

log = logging.getLogger(__name__)

SCENARIOS = ("zero_shot", "linear_probe", "lora_dual", "lora_vision", "lora_text", "full")
PROJECTIONS = {"visual": "visual.proj.", "text": "text.text_projection."}
_TOWERS = {"lora_dual": ("visual", "text"), "lora_vision": ("visual",), "lora_text": ("text",),
           "linear_probe": ("visual", "text")}


@dataclass
class FinetuneConfig:
    """`model.finetune.*`. In a CLIP experiment `scenario` is null for pre-training (every parameter
    trains, no LoRA); `examples/finetune_clip.py` runs one of SCENARIOS (its configs say which)."""

    scenario: str | None = "lora_dual"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train_logit_scale: bool | None = None  # None: only in `full`
    # LoRA adapters alone (a file written by `finetune_clip.py export-adapters`), loaded into the
    # adapters at start; base weights come from checkpoint.init_from.
    adapters: str | None = None


@dataclass
class FinetuneSummary:
    scenario: str
    trainable: int
    total: int
    adapted: list

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def line(self) -> str:
        return (f"fine-tuning scenario {self.scenario}: {self.trainable:,} of {self.total:,} parameters train "
                f"({100 * self.share:.2f}%), LoRA on {len(self.adapted)} linears")


def uses_lora(cfg: FinetuneConfig | None) -> bool:
    return cfg is not None and cfg.scenario is not None and cfg.scenario.startswith("lora_")


def attach_lora(model: torch.nn.Module, cfg: FinetuneConfig) -> list[str]:
    """The scenario's LoRA adapters (none outside lora_*), without touching requires_grad: the
    structure a checkpoint of that scenario has (tools, a fine-tuned teacher)."""
    if not uses_lora(cfg):
        return []
    return apply_lora(model, cfg.lora, include=[f"{t}." for t in _TOWERS[cfg.scenario]])


def configure_finetune(model: torch.nn.Module, cfg: FinetuneConfig, quiet: bool = False) -> FinetuneSummary:
    """Attach LoRA (for lora_* scenarios) and set requires_grad; logs (unless `quiet`) and returns
    the counts.

    Works on a TP-sharded model or one pipeline stage (counts are this stage's, at TP=1).
    """
    if cfg.scenario not in SCENARIOS:
        raise ValueError(f"finetune scenario {cfg.scenario!r}: use one of {', '.join(SCENARIOS)}")
    towers = _TOWERS.get(cfg.scenario, ())
    adapted = attach_lora(model, cfg)
    prefixes = tuple(PROJECTIONS[t] for t in towers)
    train_scale = cfg.scenario == "full" if cfg.train_logit_scale is None else cfg.train_logit_scale

    def trainable(name: str, _param) -> bool:
        if cfg.scenario == "zero_shot":
            return False
        if name == "logit_scale":
            return train_scale
        if cfg.scenario == "full":
            return True
        return is_lora_key(name) or name.startswith(prefixes)

    set_trainable_(model, trainable)
    trainable_count, total = count_parameters(model)
    summary = FinetuneSummary(cfg.scenario, trainable_count, total, adapted)
    if not quiet:
        log.info(summary.line())
    return summary
