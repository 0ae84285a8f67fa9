"""The CLIP family: data, tokenizer, model, loss and evaluation from one `CLIPExperimentConfig`,
registered with the engine as `CLIP` (see `engine.family`)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

from data.pipeline import build_clip_dataloader, expand_shards
from data.synthetic import generate_shapes_dataset, read_captions
from data.tokenizers import Tokenizer, build_tokenizer
from data.transforms import build_image_transform
from engine.evaluation import (
    class_embeddings,
    collect_features,
    retrieval_recall,
    zero_shot_accuracy,
)
from engine.config import ConfigError
from engine.family import ModelFamily, TrainingParts
from engine.flops import BatchLayout, clip_flops_per_sample
from engine.layout import check_divides
from engine.precision import PrecisionPlan
from engine.schema import NEMO_GENERIC_ALIASES
from engine.schedules import pipelined_forward
from models.clip.config import CLIPExperimentConfig
from models.clip.distill import teacher_outputs
from models.clip.fastclip import clamp_logit_scale_, init_logit_scale_, resolve_version
from models.clip.finetune import attach_lora, uses_lora
from models.clip.loss_factory import create_loss
from models.clip.model import CLIPModel, count_parameters, normalize_features
from models.common.attention import announce_attention_backend
from parallel.p2p import StageLink

log = logging.getLogger("engine")


@dataclass
class ClipData:
    train_shards: list[str]
    eval_shards: list[str]
    classes: dict | None  # {"classnames": [...], "templates": [...]} for zero-shot
    tokenizer: Tokenizer


def _on_rank0_then_all(ctx, fn):
    """Run `fn` on global rank 0 (e.g. write files), then let every rank continue."""
    result = fn() if ctx.rank == 0 else None
    dist.barrier()
    return result


def prepare_data(cfg, ctx) -> ClipData:
    """Shards and tokenizer. Without `data.train_shards`, write the synthetic shapes set first."""
    data_cfg = cfg.data
    if data_cfg.train_shards is None:
        syn = data_cfg.synthetic
        _on_rank0_then_all(ctx, lambda: generate_shapes_dataset(
            syn.out_dir, num_train=syn.num_train, num_eval=syn.num_eval, image_size=syn.image_size,
            samples_per_shard=syn.samples_per_shard, seed=syn.seed))
        train_spec, eval_spec = os.path.join(syn.out_dir, "train-*.tar"), os.path.join(syn.out_dir, "eval-*.tar")
        classes_file = data_cfg.classes_file or os.path.join(syn.out_dir, "classes.json")
        caption_source = syn.out_dir
    else:
        train_spec, eval_spec, classes_file = data_cfg.train_shards, data_cfg.eval_shards, data_cfg.classes_file
        caption_source = None
    classes = None
    if classes_file:
        with open(classes_file) as fh:
            classes = json.load(fh)
    tok_cfg = data_cfg.tokenizer
    cache_dir = os.path.join(cfg.trainer.output_dir, "tokenizer")

    def make_tokenizer():
        texts = None
        if tok_cfg.type == "sentencepiece" and tok_cfg.path is None:
            if caption_source is None:
                raise ValueError("data.tokenizer.path is required with user shards (a SentencePiece .model "
                                 "or a CLIP BPE file); a tokenizer is trained only for the synthetic data")
            texts = read_captions(caption_source, split="train")
        return build_tokenizer(tok_cfg.type, tok_cfg.path, train_texts=texts, vocab_size=tok_cfg.vocab_size,
                               cache_dir=cache_dir)

    _on_rank0_then_all(ctx, make_tokenizer)  # trains and caches once
    tokenizer = make_tokenizer()  # every rank loads the cached model
    return ClipData(expand_shards(train_spec), expand_shards(eval_spec) if eval_spec else [], classes, tokenizer)


def build_model(cfg, ctx, tokenizer: Tokenizer, precision: PrecisionPlan) -> CLIPModel:
    text = cfg.model.text
    if tokenizer.vocab_size > text.vocab_size:  # the embedding must hold every token id
        log.info("model.text.vocab_size raised from %d to the tokenizer's %d", text.vocab_size, tokenizer.vocab_size)
        text.vocab_size = tokenizer.vocab_size
    text.eot_token_id = tokenizer.eot_id
    model = CLIPModel(cfg.model, use_cpu_initialization=ctx.device.type == "cpu",
                      sequence_parallel=cfg.parallel.sequence_parallel,
                      **precision.transformer_overrides()).to(ctx.device)
    # Everything outside the megatron blocks (patch/token embeddings, norms, projections,
    # logit_scale) follows the block's parameter dtype, so the optimizer sees one dtype.
    model.to(precision.params_dtype)
    announce_attention_backend(model.attention_backend, ctx.device)
    if ctx.is_logging_rank:
        log.info("CLIP model: %.2fM parameters on this rank (vision %.2fM, text %.2fM)",
                 count_parameters(model) / 1e6, count_parameters(model.visual) / 1e6,
                 count_parameters(model.text) / 1e6)
    return model


@dataclass
class StepInputs:
    """What the loss takes beside the features: the run's clock (FastCLIP's epoch) and the teacher."""

    clock: object = None
    teacher: torch.nn.Module | None = None
    # Model FLOPs of one training sample given the text tower's length (engine.flops), or None
    flops_per_sample: Callable[[int], float] | None = None


def clip_forward_step(loss_fn, device, model, batch, inputs=None, *, extras: StepInputs | None = None):
    """One micro-batch through this pipeline stage (see `engine.schedules`): the loss on the last
    stage, the message for the next stage elsewhere. A loss that needs them gets the batch's sample
    indices and the epoch (FastCLIP) and the teacher's outputs (distillation); under PP the last
    stage reads the batch for them too."""
    images = tokens = full_tokens = None
    info = {"samples": 0, "tokens": 0}
    if batch is not None:
        full_tokens = batch["tokens"]
        trimmed = model.trim_text(full_tokens)  # on the host copy: reading the lengths costs no GPU sync
        images, tokens = batch["images"].to(device, non_blocking=True), trimmed.to(device, non_blocking=True)
        samples, text_length = images.shape[0], tokens.shape[1]
        info = {"samples": samples, "tokens": samples * (model.cfg.vision.seq_length + text_length)}
        if extras is not None and extras.flops_per_sample is not None:
            info["flops"] = samples * extras.flops_per_sample(text_length)
    out = model.stage_forward(inputs, images, tokens)
    if not model.post_process:
        return out, info
    image, text = normalize_features(out["image_features"]), normalize_features(out["text_features"])
    kwargs = {}
    if getattr(loss_fn, "needs_sample_index", False):
        kwargs.update(sample_index=batch["sample_index"].to(device), epoch=extras.clock.epoch)
    if extras is not None and extras.teacher is not None:
        # the teacher sees the batch's tokens as they came: its own tower decides what it may drop
        teacher_tokens = full_tokens.to(device, non_blocking=True) if full_tokens is not None else None
        teacher = teacher_outputs(extras.teacher, images, teacher_tokens)
        if getattr(loss_fn, "needs_teacher", False):
            kwargs.update(teacher)
    return loss_fn(image, text, model.scale(), **kwargs), info


def pipelined_encoders(model: CLIPModel, link: StageLink | None):
    """`encode_image` / `encode_text` that run through every pipeline stage (every stage is given
    the same inputs) and return the normalised features on every stage of the pipeline."""
    if link is None:
        return model.encode_image, model.encode_text

    def encode(key: str, images=None, tokens=None):
        out = pipelined_forward(model, link, lambda inputs: model.stage_forward(inputs, images, tokens))
        batch = (images if images is not None else tokens).shape[0]
        features = torch.empty(batch, model.cfg.output_dim, device=link.device)
        if out is not None:
            features.copy_(normalize_features(out[key]))
        last = dist.get_global_rank(link.group, link.size - 1)
        dist.broadcast(features, last, group=link.group)
        return features

    return (lambda images: encode("image_features", images=images),
            lambda tokens: encode("text_features", tokens=tokens))


def make_eval_fn(cfg, ctx, model: CLIPModel, data: ClipData, link: StageLink | None = None):
    if not data.eval_shards or not (cfg.eval.zero_shot or cfg.eval.retrieval):
        return None
    transform = build_image_transform(model.cfg.vision.img_h, train=False,
                                      mean=model.cfg.vision.image_mean, std=model.cfg.vision.image_std)
    context_length = model.cfg.text.encoder_seq_length

    def tokenize(texts):
        return data.tokenizer(texts, context_length=context_length).to(ctx.device)

    encode_image, encode_text = pipelined_encoders(model, link)

    def evaluate(step: int) -> dict:
        model.eval()
        # Every rank reads the (small) eval set; batches are split over DP and features gathered.
        loader = build_clip_dataloader(
            data.eval_shards, dp_rank=0, dp_size=1, batch_size=cfg.eval.batch_size, tokenizer=data.tokenizer,
            image_transform=transform, context_length=context_length, shuffle_buffer=0, seed=0, infinite=False)
        images, texts, labels = collect_features(
            encode_image, encode_text, loader, ctx.dp_rank, ctx.dims.dp, ctx.dp_group, ctx.device)
        metrics = {}
        if cfg.eval.zero_shot and data.classes and labels is not None:
            embeds = class_embeddings(encode_text, tokenize, data.classes["classnames"],
                                      data.classes["templates"]).cpu()
            metrics.update(zero_shot_accuracy(images, labels, embeds, attributes=data.classes.get("attributes")))
            metrics["zero_shot_chance"] = 1.0 / len(data.classes["classnames"])
        if cfg.eval.retrieval:
            metrics.update(retrieval_recall(images, texts))
        metrics["val_loss"] = validation_loss(images, texts, scale_everywhere(model, link), cfg.eval.batch_size)
        model.train()
        return metrics

    return evaluate


def scale_everywhere(model: CLIPModel, link: StageLink | None) -> float:
    """The model's logit scale (held by the last pipeline stage) on every stage."""
    value = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    if model.post_process:
        value.fill_(float(model.scale().detach()))
    if link is not None:
        dist.broadcast(value, dist.get_global_rank(link.group, link.size - 1), group=link.group)
    return float(value)


@torch.no_grad()
def validation_loss(images: torch.Tensor, texts: torch.Tensor, scale: float, batch_size: int) -> float:
    """The contrastive loss on the evaluation pairs, in batches of `batch_size` (the last one may
    be smaller), at the model's scale: the seed's validation loss, for early stopping."""
    if images.shape[0] < 2:
        return float("nan")
    total, count = 0.0, 0
    for start in range(0, images.shape[0], batch_size):
        img, txt = images[start:start + batch_size].float(), texts[start:start + batch_size].float()
        if img.shape[0] < 2:
            continue
        logits = scale * img @ txt.T
        labels = torch.arange(img.shape[0])
        loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        total, count = total + float(loss) * img.shape[0], count + img.shape[0]
    return total / count


def fastclip_data_size(cfg) -> int:
    """Rows of the data set (sample indices are below it): model.loss.data_size, or the synthetic
    set's training rows."""
    size = cfg.model.loss.data_size
    if size is not None and size > 0:
        return size
    if cfg.data.train_shards is None:
        return cfg.data.synthetic.num_train
    raise ConfigError("model.loss.name=fastclip with user shards needs model.loss.data_size: the number of input "
                      "rows (sample keys are numbered below it, as img2dataset's)")


def _train_transform(cfg, vision):
    if cfg.data.augmentation is not None:
        from data.augment import build_augmentation

        return build_augmentation(cfg.data.augmentation, vision.img_h, mean=vision.image_mean, std=vision.image_std,
                                  seed=cfg.trainer.seed)
    return build_image_transform(vision.img_h, train=True, mean=vision.image_mean, std=vision.image_std,
                                 scale=tuple(cfg.data.random_crop_scale))


def _log_trainable(ctx, model: CLIPModel, scenario: str) -> None:
    """How many parameters train and what share, over the whole model (every pipeline stage, at TP=1)."""
    from models.common.lora import count_parameters as trainable_and_total

    counts = torch.tensor(trainable_and_total(model, ctx.dims.tp), dtype=torch.float64, device=ctx.device)
    if ctx.dims.pp > 1:
        dist.all_reduce(counts, group=ctx.pp_group)
    trainable, total = (int(v) for v in counts.tolist())
    log.info("fine-tuning scenario %s: %s of %s parameters train (%.2f%%)%s", scenario, f"{trainable:,}",
             f"{total:,}", 100.0 * trainable / max(total, 1),
             f", LoRA rank {model.cfg.finetune.lora.rank} on {', '.join(model.cfg.finetune.lora.target_modules)}"
             if uses_lora(model.cfg.finetune) else "")


def _temperature_group(cfg, model: CLIPModel):
    """FastCLIP v0/v3: the learned temperature gets lr_tau and its own schedule (the reference's
    --lr_tau and --lr_tau_scheduler), no weight decay."""
    from engine.optim import ParamGroup
    from models.clip.fastclip import resolve_lr_tau, temperature_lr

    loss_cfg, sched = cfg.model.loss, cfg.optim.sched
    lr_tau = resolve_lr_tau(loss_cfg, cfg.optim.lr)

    def lr(step: int, _scheduled: float) -> float:
        tau = float(torch.exp(-model.logit_scale.detach().float()))
        return temperature_lr(step, loss_cfg, lr_tau, tau, sched.warmup_steps, cfg.trainer.max_steps)

    return ParamGroup("temperature", weight_decay=False, lr=lr)


def init_student_from_teacher(model: CLIPModel, full: dict, ctx):
    """Copy every student parameter whose name and full shape match the teacher's; log what was
    left out, over the whole model (every pipeline stage's report, in global layer names)."""
    from models.clip.distill import InitReport, init_from_teacher
    from parallel.pp_sharding import global_name, layer_offsets

    offsets = layer_offsets(model)
    report = init_from_teacher(model, full, ctx.tp_rank, ctx.dims.tp, name_map=lambda n: global_name(n, offsets))
    mine = InitReport([global_name(n, offsets) for n in report.copied],
                      [(global_name(n, offsets), a, b) for n, a, b in report.shape_mismatch],
                      [global_name(n, offsets) for n in report.missing_in_teacher], [])
    parts = [mine]
    if ctx.dims.pp > 1:
        parts = [None] * ctx.dims.pp
        dist.all_gather_object(parts, mine, group=ctx.pp_group)
    merged = InitReport()
    for part in parts:
        merged.copied += part.copied
        merged.shape_mismatch += part.shape_mismatch
        merged.missing_in_teacher += part.missing_in_teacher
    used = set(merged.copied) | {n for n, _, _ in merged.shape_mismatch}
    merged.unused_teacher = sorted(k for k, v in full.items() if torch.is_tensor(v) and k not in used)
    log.info("%s", merged.summary())
    return merged


def load_adapters(model: CLIPModel, path: str, ctx) -> None:
    """LoRA adapters alone (TP=1 tensors, `finetune_clip.py export-adapters`) into this rank's adapters."""
    from conversion.files import load_tensor_file
    from models.common.lora import is_lora_key
    from parallel.pp_sharding import global_name, layer_offsets
    from parallel.tp_sharding import shard_tensor

    saved = load_tensor_file(path)
    offsets = layer_offsets(model)
    own = {n: p for n, p in model.named_parameters() if is_lora_key(n)}
    wanted = {global_name(n, offsets): n for n in own}
    missing = sorted(set(wanted) - set(saved))
    if missing or not own:
        raise ConfigError(f"model.finetune.adapters={path}: " + (f"lacks {len(missing)} adapters of this model, e.g. "
                          f"{missing[:3]}" if own else "this model has no LoRA adapters (model.finetune.scenario?)"))
    with torch.no_grad():
        for name, local in wanted.items():
            param, tensor = own[local], saved[name]
            if getattr(param, "tensor_model_parallel", False):
                tensor = shard_tensor(tensor, param.partition_dim, 1, ctx.tp_rank, ctx.dims.tp)
            if tuple(tensor.shape) != tuple(param.shape):
                raise ConfigError(f"model.finetune.adapters={path}: {name} has shape {tuple(tensor.shape)}, this model "
                                  f"{tuple(param.shape)} (another LoRA rank or targets?)")
            param.copy_(tensor.to(param.dtype))
    log.info("LoRA adapters loaded from %s (%d tensors)", path, len(wanted))


def log_sample_state_bytes(loss_cfg, data_size: int, dp: int) -> dict:
    """FastCLIP's per-sample state on each DP rank (the first rank's block, the largest) against a
    full copy on every rank (the reference's layout)."""
    from models.clip.sample_state import block_bounds

    spec = resolve_version(loss_cfg)
    states = 8 if spec.temperature_scheme == "individual" else 2  # u (+ tau_i and its two moments) per modality
    per_rank = states * 4 * block_bounds(data_size, dp, 0)[1]
    full = states * 4 * data_size
    log.info("FastCLIP %s: per-sample state %s bytes on each of %d DP ranks (%d states x %d samples, fp32); the "
             "reference keeps a full copy on every rank, %s bytes", spec.name, f"{per_rank:,}", dp, states,
             block_bounds(data_size, dp, 0)[1], f"{full:,}")
    return {"fastclip_state_bytes_per_rank": per_rank, "fastclip_state_bytes_full_copy": full}


def build(cfg, ctx, precision: PrecisionPlan) -> TrainingParts:
    """This rank's share of a CLIP run: the stage's model, its loss (contrastive or FastCLIP, with
    distillation from a frozen teacher), the fine-tuning scenario, the data it reads (the first
    pipeline stage; the last too when its loss needs sample indices or the teacher's inputs),
    evaluation, early stopping, and the state every checkpoint keeps."""
    from models.clip.run_state import EarlyStopMonitor, SampleStateEntries, TrainClock
    from models.clip.teacher import build_teacher, check_teacher_reads_student_inputs, read_teacher_source

    m, distill, finetune = cfg.model, cfg.model.distill, cfg.model.finetune
    problems = recipe_problems(cfg)  # also checked before launch (preflight); here for direct callers
    if problems:
        raise ConfigError("\n".join(problems))
    data = prepare_data(cfg, ctx)
    model = build_model(cfg, ctx, data.tokenizer, precision)
    fast = m.loss.name == "fastclip"
    data_size = fastclip_data_size(cfg) if fast else None
    loss_fn = None  # only the last pipeline stage computes the loss (and holds FastCLIP's state)
    if model.post_process:
        loss_fn = create_loss(m.loss, group=ctx.dp_group, local_loss=m.local_loss,
                              gather_with_grad=m.gather_with_grad, data_size=data_size, device=ctx.device,
                              model_lr=cfg.optim.lr, distill=distill if distill.mode else None)
    learned_tau = fast and resolve_version(m.loss).learnable_tau
    if fast and model.post_process:
        init_logit_scale_(model.logit_scale, m.loss)
    source = read_teacher_source(distill) if (distill.mode or distill.init_from_teacher) else None
    if source is not None and distill.mode:
        check_teacher_reads_student_inputs(source, m, data.tokenizer, cfg.data.tokenizer, cfg.trainer.output_dir)
    if distill.init_from_teacher:
        from models.clip.teacher import teacher_full_state

        init_student_from_teacher(model, teacher_full_state(source), ctx)
    key_map = None
    if finetune.scenario is not None:
        from models.clip.finetune import configure_finetune

        configure_finetune(model, finetune, quiet=True)
        _log_trainable(ctx, model, finetune.scenario)
        if uses_lora(finetune):
            from engine.checkpoint import KeyMap

            key_map = KeyMap(allow_missing=["*.lora.*"])  # base weights (checkpoint.init_from) into LoRA layers
        if finetune.adapters:
            load_adapters(model, finetune.adapters, ctx)
    if learned_tau and model.post_process and model.logit_scale.requires_grad:
        model.temperature_group = _temperature_group(cfg, model)
    # After the student, so the student's initialisation does not depend on having a teacher.
    teacher = None
    if distill.mode:
        teacher = build_teacher(source, data.tokenizer, ctx, precision, holds=model.post_process,
                                sequence_parallel=cfg.parallel.sequence_parallel)
    link = StageLink(ctx.device) if ctx.dims.pp > 1 else None  # evaluation's own forward-only link
    if m.text.trim_to_longest:
        log.info("text tower: %s", "the whole context under pipeline parallelism (model.text.trim_to_longest needs "
                 "the tower on one stage)" if ctx.dims.pp > 1 else "each batch up to its longest caption "
                 "(model.text.trim_to_longest; exact, see models/clip/towers.py)")
    samples_per_epoch = (m.loss.samples_per_epoch if m.loss.samples_per_epoch > 0 else data_size) if fast else None
    clock = TrainClock(cfg.trainer.global_batch_size, samples_per_epoch)

    def batch_layout() -> BatchLayout:  # read when called: the batch finder may change the micro-batch
        return BatchLayout(cfg.trainer.micro_batch_size, ctx.dims.dp, cfg.trainer.global_batch_size)

    extras = StepInputs(clock=clock, teacher=teacher, flops_per_sample=lambda text_length: clip_flops_per_sample(
        m, batch_layout(), text_seq_length=text_length))
    needs_batch_on_last = getattr(loss_fn, "needs_sample_index", False) or teacher is not None
    reads_data = model.pre_process or (model.post_process and needs_batch_on_last)
    if cfg.batch_finder.enabled:
        from models.clip.batch_finder import find_clip_micro_batch

        cfg.trainer.micro_batch_size = find_clip_micro_batch(
            cfg, ctx, model, lambda probe_loss: partial(clip_forward_step, probe_loss, ctx.device, extras=extras),
            link, precision, data.tokenizer.vocab_size, reads_data)
    train_loader = None
    if reads_data:
        vision = m.vision
        train_loader = build_clip_dataloader(
            data.train_shards, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp, batch_size=cfg.trainer.micro_batch_size,
            tokenizer=data.tokenizer, image_transform=_train_transform(cfg, vision),
            context_length=m.text.encoder_seq_length, shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.trainer.seed, infinite=True, num_workers=cfg.data.num_workers,
            with_sample_index=getattr(loss_fn, "needs_sample_index", False))
    extra_state = {"clock": clock}
    if fast:
        log_sample_state_bytes(m.loss, data_size, ctx.dims.dp)
        if model.post_process:
            extra_state["fastclip"] = SampleStateEntries(loss_fn.sample_state)
    eval_fn = make_eval_fn(cfg, ctx, model, data, link)
    monitor = None
    if cfg.eval.early_stopping.monitor:
        if eval_fn is None:
            raise ConfigError("eval.early_stopping.monitor needs an evaluation (eval shards with zero_shot or retrieval)")
        monitor = EarlyStopMonitor(cfg.eval.early_stopping)
        extra_state["early_stopping"] = monitor.stopper
        evaluate = eval_fn

        def eval_fn(step: int) -> dict:  # noqa: F811 - the evaluation, then the early-stopping check
            metrics = evaluate(step)
            monitor.observe(step, metrics)
            return metrics

    def after_step(step: int, skipped: bool) -> None:
        clock.step = step
        if learned_tau and model.post_process and not skipped:
            clamp_logit_scale_(model.logit_scale, m.loss)  # tau stays in [tau_min, tau_max], as the reference

    return TrainingParts(model=model, forward_step=partial(clip_forward_step, loss_fn, ctx.device, extras=extras),
                         train_loader=train_loader, eval_fn=eval_fn, extra_state=extra_state,
                         summary=partial(data_totals, ctx, train_loader), init_key_map=key_map,
                         after_step=after_step, stop_requested=monitor.stop_requested if monitor else None,
                         flops_per_sample=clip_flops_per_sample(m, batch_layout()))


def data_totals(ctx, train_loader) -> dict:
    """Samples read and skipped, and shard reads skipped, summed over data-parallel replicas
    (collective; the TP ranks of a replica read the same shards, so one of them counts)."""
    stats = train_loader.stats if train_loader is not None and ctx.tp_rank == 0 else None
    counts = torch.tensor([stats.samples_seen, stats.samples_skipped, stats.shards_skipped] if stats else [0, 0, 0],
                          dtype=torch.float64, device=ctx.device)
    dist.all_reduce(counts)
    seen, skipped, shards = (int(v) for v in counts.tolist())
    return {"data_samples_read": seen, "data_samples_skipped": skipped, "data_shard_reads_skipped": shards}


def preflight(cfg) -> list[str]:
    """What can be checked before any process group exists: the shards, class list and tokenizer a
    run with user data needs (with the command that makes a tokenizer when there is none), and a
    warning when zero-shot evaluation would find no labels."""
    from data.train_tokenizer import REQUIREMENTS

    data, problems = cfg.data, recipe_problems(cfg)
    if data.train_shards is None:
        return problems  # the synthetic set brings its own shards, classes and tokenizer
    for key in ("train_shards", "eval_shards"):
        spec = getattr(data, key)
        if spec is not None:
            try:
                expand_shards(spec)
            except FileNotFoundError as exc:
                problems.append(f"data.{key}: {exc}")
    if data.classes_file is not None and not os.path.isfile(data.classes_file):
        problems.append(f"data.classes_file={data.classes_file}: no such file")
    tok = data.tokenizer
    if tok.path is None:
        if tok.type == "sentencepiece":
            problems.append("data.tokenizer.path is required with user shards (a tokenizer is trained only for the "
                            f"synthetic data): {REQUIREMENTS}, or use data.tokenizer.type=clip_bpe with OpenAI's "
                            "bpe_simple_vocab_16e6.txt.gz")
        else:
            problems.append("data.tokenizer.type=clip_bpe needs data.tokenizer.path (bpe_simple_vocab_16e6.txt.gz)")
    elif not os.path.isfile(tok.path):
        problems.append(f"data.tokenizer.path={tok.path}: no such file")
    else:
        try:
            build_tokenizer(tok.type, tok.path)
        except ValueError as exc:
            problems.append(f"data.tokenizer.path: {exc}")
    if not problems and cfg.eval.zero_shot and data.classes_file and data.eval_shards:
        _warn_without_class_index(data.eval_shards, data.classes_file)
    return problems


def recipe_problems(cfg) -> list[str]:
    """The loss, teacher and fine-tuning settings a run cannot start with, each naming its key."""
    m, problems = cfg.model, []
    distill, scenario = m.distill, m.finetune.scenario
    if m.loss.name == "fastclip":
        try:
            resolve_version(m.loss)
        except ValueError as exc:
            problems.append(str(exc))
        if cfg.data.train_shards is not None and (m.loss.data_size is None or m.loss.data_size < 1):
            problems.append("model.loss.name=fastclip with user shards needs model.loss.data_size: the number of "
                            "input rows (sample keys are numbered below it, as img2dataset's)")
    if (distill.mode or distill.init_from_teacher) and not distill.teacher:
        problems.append("model.distill.mode / init_from_teacher need model.distill.teacher (the reference model)")
    elif distill.teacher and (distill.mode or distill.init_from_teacher) and not os.path.exists(distill.teacher):
        problems.append(f"model.distill.teacher={distill.teacher}: no such file or directory")
    if distill.init_from_teacher and cfg.checkpoint.init_from:
        problems.append("model.distill.init_from_teacher and checkpoint.init_from both initialise the model; choose one")
    if scenario == "zero_shot":
        problems.append("model.finetune.scenario=zero_shot trains nothing: evaluate with examples/eval_clip.py or "
                        "examples/finetune_clip.py (which does so for zero_shot)")
    if m.finetune.adapters and not os.path.isfile(m.finetune.adapters):
        problems.append(f"model.finetune.adapters={m.finetune.adapters}: no such file")
    if cfg.checkpoint.init_from and not os.path.exists(cfg.checkpoint.init_from):
        problems.append(f"checkpoint.init_from={cfg.checkpoint.init_from}: no such checkpoint")
    if cfg.batch_finder.enabled and cfg.batch_finder.memory_budget_gb is None and cfg.parallel.device == "cpu":
        problems.append("batch_finder.enabled on CPU needs batch_finder.memory_budget_gb (there is no out-of-memory "
                        "to catch)")
    return problems


def _warn_without_class_index(eval_spec, classes_file: str) -> None:
    """Zero-shot accuracy needs a `class_index` in the eval samples' json; say so up front."""
    import tarfile

    first = expand_shards(eval_spec)[0]
    try:
        with tarfile.open(first) as tar:
            member = next((m for m in tar if m.isfile() and m.name.endswith(".json")), None)
            sample = json.load(tar.extractfile(member)) if member is not None else None
    except (OSError, tarfile.TarError, ValueError):
        return  # the pipeline names unreadable shards when it gets there
    if sample is None or "class_index" not in sample:
        log.warning("zero-shot evaluation is off: data.classes_file=%s is set, but the eval shards' json (first "
                    "sample of %s) has no 'class_index' field; add it to each sample's json to get zero-shot "
                    "accuracy (retrieval still runs)", classes_file, first)


def check_layout(cfg, tp: int, pp: int) -> list[str]:
    """Heads and FFN width of both towers by TP; each tower's layers by PP (every stage holds the
    same share of both towers, see models/clip/model.py)."""
    problems = []
    for name in ("vision", "text"):
        tower = getattr(cfg.model, name)
        key = f"model.{name}"
        check_divides(problems, f"{key}.num_attention_heads", tower.num_attention_heads,
                      "tensor_model_parallel_size", tp)
        check_divides(problems, f"{key}.ffn_hidden_size", tower.ffn_hidden_size, "tensor_model_parallel_size", tp)
        check_divides(problems, f"{key}.num_layers", tower.num_layers, "pipeline_model_parallel_size", pp)
    return problems


def reference_model(model_cfg) -> CLIPModel:
    """The TP=1/PP=1 model of `model_cfg`, with the LoRA adapters of its fine-tuning scenario (the
    tensors its checkpoints hold)."""
    model = CLIPModel(model_cfg, use_cpu_initialization=True)
    attach_lora(model, model_cfg.finetune)
    return model


def vocab_rows(model_cfg, tp: int) -> int:
    """Rows of the text tower's vocab-parallel embedding at tensor-parallel size `tp`."""
    multiple = model_cfg.text.make_vocab_size_divisible_by * tp
    return -(-model_cfg.text.vocab_size // multiple) * multiple


# The "To Enable" column of NeMo's CLIP feature table (and NeMo's model.* placement of parallel,
# batch and optimizer keys): a NeMo user's keys work here, each use logged once.
NEMO_ALIASES = {
    **NEMO_GENERIC_ALIASES,
    "model.vision.use_flash_attention": "model.use_flash_attention",
    "model.text.use_flash_attention": "model.use_flash_attention",
    # The table says "same for model.llm" (NeMo's multimodal docs call the text tower that).
    "model.llm.use_flash_attention": "model.use_flash_attention",
    "model.llm.activations_checkpoint_granularity": "model.text.activations_checkpoint_granularity",
    "model.llm.activations_checkpoint_method": "model.text.activations_checkpoint_method",
    "model.llm.activations_checkpoint_num_layers": "model.text.activations_checkpoint_num_layers",
}

CLIP = ModelFamily(
    name="clip",
    config_cls=CLIPExperimentConfig,
    build=build,
    check_layout=check_layout,
    reference_model=reference_model,
    vocab_rows=vocab_rows,
    entry_point="examples/pretrain_clip.py",
    config_aliases=NEMO_ALIASES,
    preflight=preflight,
    description="CLIP: ViT image tower + causal text tower, contrastive loss (NeMo's size table B/32..e/14)",
)
