"""The frozen reference CLIP (the teacher) of a run: where its weights come from, the model built at
the student's tensor-parallel size, and its full (TP=1) state dict for init-from-teacher.

Sources (`model.distill.teacher_format`):
- engine: a checkpoint of this project (any TP/PP layout); the architecture is the one saved in
  it, the weights load through `engine.checkpoint.load_model_weights`, each rank reading only its
  tensor-parallel share;
- open_clip: a state dict file or `local-dir` directory, converted by `conversion.openclip_format`;
- hf: a Hugging Face CLIPModel directory, converted by `conversion.hf_clip_format`.

The teacher is one whole model (no pipeline split) on the ranks of the student's last pipeline
stage, where the loss is: the same TP group as the student's stage, so its features are replicated
over TP as the student's are. It reads the student's images and tokens, so it must take the same
image size and the same tokenizer (checked, or warned when only the settings can be compared).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from engine.config import ConfigError
from models.clip.config import CLIPConfig
from models.clip.distill import DistillConfig, freeze_teacher_
from models.clip.finetune import attach_lora

log = logging.getLogger("engine")


@dataclass
class TeacherSource:
    kind: str  # engine | open_clip | hf
    path: str
    model_cfg: CLIPConfig
    tokenizer: object = None  # engine checkpoints: the teacher run's data.tokenizer settings
    tokenizer_file: str | None = None  # ... and the file they name (or the one that run trained)
    full_state: dict | None = None  # open_clip / hf: the converted TP=1 state dict


def read_teacher_source(cfg: DistillConfig) -> TeacherSource:
    """The teacher's architecture (and, for the converters, its weights) from `model.distill.*`."""
    if not cfg.teacher:
        raise ConfigError("model.distill.mode / init_from_teacher need model.distill.teacher (the reference model)")
    kind = cfg.teacher_format
    if kind == "engine":
        from engine.checkpoint.storage import CheckpointError
        from engine.checkpoint.tools import saved_experiment

        try:  # a CLIP checkpoint's, whose config must fit this engine's schema
            path, exp = saved_experiment(cfg.teacher, "clip", verify=False)
        except CheckpointError as exc:
            raise ConfigError(f"model.distill.teacher={cfg.teacher}: {exc}") from exc
        tok = exp.data.tokenizer
        return TeacherSource(kind, path, exp.model, tokenizer=tok,
                             tokenizer_file=tok.path or _trained_tokenizer(exp.trainer.output_dir, tok.vocab_size))
    if kind == "open_clip":
        from conversion.openclip_format import (
            import_openclip,
            openclip_config_from_state_dict,
            openclip_model_config,
            read_openclip,
        )

        state, dir_cfg, _ = read_openclip(cfg.teacher)
        model_cfg = (openclip_model_config(cfg.teacher_config) if cfg.teacher_config else
                     dir_cfg if dir_cfg is not None else openclip_config_from_state_dict(state))
        clip_cfg, full = import_openclip(state, model_cfg)
        return TeacherSource(kind, cfg.teacher, clip_cfg, full_state=full)
    if kind == "hf":
        from conversion.hf_clip_format import import_hf_clip

        clip_cfg, full = import_hf_clip(cfg.teacher)
        return TeacherSource(kind, cfg.teacher, clip_cfg, full_state=full)
    raise ConfigError(f"model.distill.teacher_format={kind!r}: use engine, open_clip or hf")


def _trained_tokenizer(output_dir: str, vocab_size: int) -> str:
    """Where a run that trained its SentencePiece tokenizer keeps it (data/tokenizers.py)."""
    import os

    return os.path.join(output_dir, "tokenizer", f"spm_bpe_{vocab_size}.model")


def _same_file(a: str | None, b: str | None) -> bool | None:
    """Whether two tokenizer files hold the same bytes; None when either is not there to read."""
    import filecmp
    import os

    if not a or not b or not os.path.isfile(a) or not os.path.isfile(b):
        return None
    return filecmp.cmp(a, b, shallow=False)


def teacher_full_state(source: TeacherSource) -> dict:
    """The teacher's TP=1/PP=1 state dict (every rank reads it: init-from-teacher copies from it)."""
    if source.full_state is not None:
        return source.full_state
    from engine.checkpoint.tools import read_model_checkpoint

    _, full = read_model_checkpoint(source.path)
    return full


def check_teacher_reads_student_inputs(source: TeacherSource, student: CLIPConfig, tokenizer, tokenizer_cfg,
                                       student_output_dir: str = "") -> None:
    """The teacher sees the student's images and tokens: same image size and a vocabulary that
    holds every token id; a different tokenizer setting is warned about (its ids would mean
    other words)."""
    t = source.model_cfg
    if (t.vision.img_h, t.vision.img_w) != (student.vision.img_h, student.vision.img_w):
        raise ConfigError(f"the teacher ({source.path}) takes {t.vision.img_h}x{t.vision.img_w} images, the student "
                          f"{student.vision.img_h}x{student.vision.img_w}: they read the same images")
    if tokenizer.vocab_size > t.text.vocab_size:
        raise ConfigError(f"the teacher's vocabulary ({t.text.vocab_size}) is smaller than the tokenizer's "
                          f"({tokenizer.vocab_size}): the teacher reads the student's tokens; use the teacher's "
                          "tokenizer (data.tokenizer.*)")
    if t.text.encoder_seq_length < student.text.encoder_seq_length:
        raise ConfigError(f"the teacher's context length ({t.text.encoder_seq_length}) is shorter than the student's "
                          f"({student.text.encoder_seq_length})")
    theirs = source.tokenizer
    if theirs is None:
        return
    mine = tokenizer_cfg.path or _trained_tokenizer(student_output_dir, tokenizer_cfg.vocab_size)
    same = _same_file(source.tokenizer_file, mine)
    if same is None:
        same = (theirs.type, theirs.path, theirs.vocab_size) == (tokenizer_cfg.type, tokenizer_cfg.path,
                                                                 tokenizer_cfg.vocab_size)
    if not same:
        log.warning("the teacher's tokenizer (%s) is not this run's (%s): the teacher reads other words; point "
                    "data.tokenizer.path to the teacher run's tokenizer", source.tokenizer_file or vars(theirs), mine)


def teacher_model_config(source: TeacherSource, tokenizer) -> CLIPConfig:
    cfg = copy.deepcopy(source.model_cfg)
    cfg.text.eot_token_id = tokenizer.eot_id  # the student's end-of-text id: the tokens are the student's
    return cfg


def build_teacher(source: TeacherSource, tokenizer, ctx, precision, *, holds: bool, sequence_parallel: bool):
    """Collective (every rank calls it): the frozen teacher on the ranks that `hold` it (the last
    pipeline stage), None elsewhere. Built at the student's TP as one stage (PP=1)."""
    from engine.checkpoint import KeyMap, load_model_weights
    from engine.checkpoint.state import Placement
    from models.clip.model import CLIPModel
    from models.common.lora import merge_lora_
    from parallel.tp_sharding import shard_full_state_dict

    teacher = None
    if holds:
        cfg = teacher_model_config(source, tokenizer)
        teacher = CLIPModel(cfg, pre_process=True, post_process=True, tensor_model_parallel_size=ctx.dims.tp,
                            pipeline_model_parallel_size=1, whole_model_on_stage=True,
                            use_cpu_initialization=ctx.device.type == "cpu",
                            sequence_parallel=sequence_parallel, **precision.transformer_overrides()).to(ctx.device)
        teacher.to(precision.params_dtype)
        attach_lora(teacher, cfg.finetune)  # a fine-tuned teacher's checkpoint holds its adapters
    if source.kind == "engine":
        # Every rank takes part (the read is collective); ranks without the teacher read nothing.
        place = Placement(ctx.tp_rank, ctx.dims.tp, 0, 1, ctx.dp_rank, ctx.dims.dp)
        load_model_weights(source.path, teacher if teacher is not None else torch.nn.Module(), place, KeyMap())
    elif teacher is not None:
        full = {k: v for k, v in source.full_state.items()}
        teacher.load_state_dict(shard_full_state_dict(full, teacher, ctx.tp_rank, ctx.dims.tp))
    m = source.model_cfg
    log.info("teacher %s (%s): vision %dx%d, text %dx%d, frozen, one stage at TP=%d%s", source.path, source.kind,
             m.vision.num_layers, m.vision.hidden_size, m.text.num_layers, m.text.hidden_size, ctx.dims.tp,
             " on the last pipeline stage" if ctx.dims.pp > 1 else "")
    if teacher is None:
        return None
    merge_lora_(teacher)  # frozen: fold the adapters into the weights once
    return freeze_teacher_(teacher)
