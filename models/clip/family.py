"""The CLIP family: data, tokenizer, model, loss and evaluation from one `CLIPExperimentConfig`,
registered with the engine as `CLIP` (see `engine.family`)."""
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
from engine.evaluation import (
    class_embeddings,
    collect_features,
    retrieval_recall,
    zero_shot_accuracy,
)
from engine.family import ModelFamily, TrainingParts
from engine.flops import BatchLayout, clip_flops_per_sample
from engine.layout import check_divides
from engine.precision import PrecisionPlan
from engine.schedules import pipelined_forward
from models.clip.config import CLIPExperimentConfig
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


def build(cfg, ctx, precision: PrecisionPlan) -> TrainingParts:
    """This rank's share of a CLIP run: the stage's model, its loss, the data it reads (the first
    pipeline stage only: later stages get activations, and the loss needs no labels) and evaluation."""
    data = prepare_data(cfg, ctx)
    model = build_model(cfg, ctx, data.tokenizer, precision)
    loss_fn = ContrastiveLoss(cfg.model.local_loss, cfg.model.gather_with_grad, group=ctx.dp_group)
    train_loader = None
    if model.pre_process:
        vision = cfg.model.vision
        train_loader = build_clip_dataloader(
            data.train_shards, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp, batch_size=cfg.trainer.micro_batch_size,
            tokenizer=data.tokenizer,
            image_transform=build_image_transform(vision.img_h, train=True, mean=vision.image_mean,
                                                  std=vision.image_std, scale=tuple(cfg.data.random_crop_scale)),
            context_length=cfg.model.text.encoder_seq_length, shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.trainer.seed, infinite=True, num_workers=cfg.data.num_workers)
    link = StageLink(ctx.device) if ctx.dims.pp > 1 else None  # evaluation's own forward-only link
    return TrainingParts(model=model, forward_step=partial(clip_forward_step, loss_fn, ctx.device),
                         train_loader=train_loader, eval_fn=make_eval_fn(cfg, ctx, model, data, link),
                         summary=partial(data_totals, ctx, train_loader),
                         flops_per_sample=clip_flops_per_sample(cfg.model, BatchLayout(
                             cfg.trainer.micro_batch_size, ctx.dims.dp, cfg.trainer.global_batch_size)))


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

    data, problems = cfg.data, []
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
    return CLIPModel(model_cfg, use_cpu_initialization=True)


def vocab_rows(model_cfg, tp: int) -> int:
    """Rows of the text tower's vocab-parallel embedding at tensor-parallel size `tp`."""
    multiple = model_cfg.text.make_vocab_size_divisible_by * tp
    return -(-model_cfg.text.vocab_size // multiple) * multiple


# The "To Enable" column of NeMo's CLIP feature table (and NeMo's model.* placement of parallel,
# batch and optimizer keys): a NeMo user's keys work here, each use logged once.
NEMO_ALIASES = {
    "model.tensor_model_parallel_size": "parallel.tensor_model_parallel_size",
    "model.pipeline_model_parallel_size": "parallel.pipeline_model_parallel_size",
    "model.sequence_parallel": "parallel.sequence_parallel",
    "model.micro_batch_size": "trainer.micro_batch_size",
    "model.global_batch_size": "trainer.global_batch_size",
    "model.optim.name": "optim.name",
    "model.optim.lr": "optim.lr",
    "model.optim.weight_decay": "optim.weight_decay",
    "model.optim.betas": "optim.betas",
    "model.optim.eps": "optim.eps",
    "model.optim.sched.warmup_steps": "optim.sched.warmup_steps",
    "model.optim.sched.min_lr": "optim.sched.min_lr",
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
