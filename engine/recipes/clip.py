"""CLIP pre-training: data, tokenizer, model, loss and evaluation from one `ExperimentConfig`."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from data.pipeline import build_clip_dataloader, expand_shards
from data.synthetic import generate_shapes_dataset, read_captions
from data.tokenizers import Tokenizer, build_tokenizer
from data.transforms import build_image_transform
from engine.checkpoint import CheckpointManager
from engine.evaluation import (
    class_embeddings,
    collect_features,
    retrieval_recall,
    zero_shot_accuracy,
)
from engine.flops import BatchLayout, clip_flops_per_sample
from engine.optim import WarmupCosineSchedule, build_optimizer
from engine.precision import PrecisionPlan, plan_precision
from engine.schedules import pipelined_forward
from engine.trainer import Trainer
from models.clip.loss import ContrastiveLoss
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


def clip_forward_step(loss_fn, device, model, batch, inputs=None):
    """One micro-batch through this pipeline stage (see `engine.schedules`): the loss on the last
    stage, the message for the next stage elsewhere."""
    images = tokens = None
    info = {"samples": 0, "tokens": 0}
    if batch is not None:
        images, tokens = batch["images"].to(device, non_blocking=True), batch["tokens"].to(device, non_blocking=True)
        tokens_per_sample = model.cfg.vision.seq_length + tokens.shape[1]
        info = {"samples": images.shape[0], "tokens": images.shape[0] * tokens_per_sample}
    out = model.stage_forward(inputs, images, tokens)
    if not model.post_process:
        return out, info
    image, text = normalize_features(out["image_features"]), normalize_features(out["text_features"])
    return loss_fn(image, text, model.scale()), info


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
        model.train()
        return metrics

    return evaluate


def build_trainer(cfg, ctx):
    """Everything a CLIP run needs; returns (trainer, train data iterator)."""
    data = prepare_data(cfg, ctx)
    rss_before_model = current_rss_bytes()
    precision = plan_precision(cfg.trainer.precision, cfg.model.megatron_amp_O2, ctx.device)
    model = build_model(cfg, ctx, data.tokenizer, precision)
    optimizer = build_optimizer(model, cfg.optim, dp_group=ctx.dp_group, model_parallel_group=ctx.model_parallel_group,
                                max_grad_norm=cfg.trainer.gradient_clip_val,
                                master_weights=precision.needs_master_weights,
                                loss_scaler=precision.loss_scaler(cfg.trainer.loss_scaler))
    if ctx.is_logging_rank:
        log.info("precision %s%s, optimizer %s (%s), optimizer state %.1f MB on this rank", precision.name,
                 " O2" if precision.o2 else "", cfg.optim.name, type(optimizer).__name__, optimizer.state_bytes() / 2**20)
    sched = cfg.optim.sched
    scheduler = WarmupCosineSchedule(optimizer, cfg.optim.lr, sched.warmup_steps, cfg.trainer.max_steps,
                                     sched.min_lr, sched.name)
    loss_fn = ContrastiveLoss(cfg.model.local_loss, cfg.model.gather_with_grad, group=ctx.dp_group)
    vision = cfg.model.vision
    train_loader = build_clip_dataloader(
        data.train_shards, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp, batch_size=cfg.trainer.micro_batch_size,
        tokenizer=data.tokenizer,
        image_transform=build_image_transform(vision.img_h, train=True, mean=vision.image_mean,
                                              std=vision.image_std, scale=tuple(cfg.data.random_crop_scale)),
        context_length=cfg.model.text.encoder_seq_length, shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.trainer.seed, infinite=True, num_workers=cfg.data.num_workers)
    link = StageLink(ctx.device) if ctx.dims.pp > 1 else None
    trainer = Trainer(cfg.trainer, ctx, model, optimizer, scheduler,
                      partial(clip_forward_step, loss_fn, ctx.device), make_eval_fn(cfg, ctx, model, data, link),
                      precision=precision, link=link,
                      flops_per_sample=clip_flops_per_sample(cfg.model, BatchLayout(
                          cfg.trainer.micro_batch_size, ctx.dims.dp, cfg.trainer.global_batch_size)))
    trainer.train_loader = train_loader
    trainer.checkpoint = CheckpointManager(cfg, ctx)  # resume, interval/final saves, preemption
    trainer.rss_before_model = rss_before_model
    # Only the first pipeline stage reads training data; later stages get the activations.
    return trainer, iter(train_loader) if model.pre_process else NoDataOnThisStage(ctx.pp_rank)


class NoDataOnThisStage:
    """The data iterator of a pipeline stage that does not read data: using it is a schedule bug."""

    def __init__(self, stage: int):
        self.stage = stage

    def __iter__(self):
        return self

    def __next__(self):
        raise RuntimeError(f"pipeline stage {self.stage} reads no data; only the first stage does")


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
