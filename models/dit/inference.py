"""A trained DiT for sampling and evaluation outside training: its config from the checkpoint, the
model built at the running TP/PP layout, its weights read through the sharded checkpoint reader (any
saved layout loads at any other).

    ctx = initialize_parallel(tp, pp, "auto")
    cfg, model = load_dit(ctx, checkpoint="runs/dit_tiny/checkpoints")
    vectors = generate(model, condition, indices, num_steps=50, sampler="heun", link=link)   # models.dit.sampling
"""
from __future__ import annotations

import logging

from engine.config import load_config
from engine.schema import BARE_KEYS

log = logging.getLogger("engine")


def dit_config(checkpoint: str | None = None, config_file: str | None = None, overrides=()):
    """The experiment config of a DiT checkpoint (its saved config_yaml) or of a config file,
    with `key=value` overrides on top."""
    from omegaconf import OmegaConf

    from models.dit.config import DiTExperimentConfig

    if checkpoint is None:
        return load_config(DiTExperimentConfig, config_file, list(overrides), BARE_KEYS)
    from engine.checkpoint.manager import resolve_checkpoint
    from engine.checkpoint.reader import CheckpointReader

    meta = CheckpointReader(resolve_checkpoint(checkpoint)).meta
    if meta.get("family") != "dit":
        raise ValueError(f"{checkpoint}: a {meta.get('family', 'clip')} checkpoint, not a DiT one")
    saved = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DiTExperimentConfig),
                                                OmegaConf.create(meta["config_yaml"])))
    if not overrides:
        return saved
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "saved.yaml")
        with open(path, "w") as fh:
            fh.write(OmegaConf.to_yaml(OmegaConf.structured(saved)))
        return load_config(DiTExperimentConfig, path, list(overrides), BARE_KEYS)


def load_dit(ctx, checkpoint: str | None = None, cfg=None, precision: str = "fp32"):
    """(cfg, this rank's GlobalDiT stage in eval mode): the checkpoint's weights, or the fresh
    initialisation of `cfg` (the untrained model a run with this seed starts from) without one."""
    from engine.checkpoint import load_model_weights
    from engine.checkpoint.manager import resolve_checkpoint
    from engine.checkpoint.state import Placement
    from engine.precision import plan_precision
    from models.dit.family import build_model

    cfg = cfg if cfg is not None else dit_config(checkpoint)
    plan = plan_precision(precision, False, ctx.device)
    model = build_model(cfg, ctx, plan)
    if checkpoint is not None:
        load_model_weights(resolve_checkpoint(checkpoint), model, Placement.from_ctx(ctx))
    return cfg, model.eval()
