"""Evaluate a CLIP model at any TP/PP/DP layout: zero-shot classification (class names x prompt
templates), image->text and text->image recall@k, and linear-probe accuracy (logistic regression
on frozen image features). The engine of `examples/eval_clip.py` (and of
`examples/finetune_clip.py` for the zero_shot scenario).

Weights: an engine checkpoint (any layout; read through `engine.checkpoint.load_model_weights`,
re-sharded to this run's), optionally with LoRA adapters from a file, or a full (TP=1) state dict
from the open_clip / Hugging Face converters, cut for this rank.

Data: the synthetic shapes eval set (with its classes.json) when the config has no shards; else
`data.eval_shards` (WebDataset, json `class_index` for labels) with `data.classes_file`; or an
image folder (one sub-folder per class, read directly). Linear probe: fit on
`probe_train_shards` when given (labelled WebDataset), else on the even-numbered evaluation
samples and tested on the odd ones.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.config import ConfigError

log = logging.getLogger("engine")

DEFAULT_TEMPLATES = ["a photo of a {}."]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class Weights:
    kind: str  # engine | full
    path: str | None = None  # engine checkpoint
    full_state: dict | None = None  # TP=1 state dict (converted open_clip / HF weights)
    adapters: str | None = None  # LoRA adapters file (with an engine base checkpoint)
    label: str = ""


@dataclass
class EvalOptions:
    image_folder: str | None = None
    probe_train_shards: str | None = None
    linear_probe: bool = True
    recall_ks: tuple = (1, 5, 10)
    out_json: str | None = None
    extra: dict = field(default_factory=dict)  # copied into the JSON (the source, say)


# ---- data --------------------------------------------------------------------------------------

def eval_data(exp, ctx):
    """(eval shards or None, classes dict or None, tokenizer) for `exp` (collective: rank 0 writes
    the synthetic set and trains its tokenizer when they are missing)."""
    from data.pipeline import expand_shards
    from data.synthetic import generate_shapes_dataset, read_captions
    from data.tokenizers import build_tokenizer

    data = exp.data
    synthetic = data.train_shards is None and data.eval_shards is None
    shards, classes_file, captions = None, data.classes_file, None
    if synthetic:
        syn = data.synthetic
        if ctx.rank == 0:
            generate_shapes_dataset(syn.out_dir, num_train=syn.num_train, num_eval=syn.num_eval,
                                    image_size=syn.image_size, samples_per_shard=syn.samples_per_shard, seed=syn.seed)
        dist.barrier()
        shards = expand_shards(os.path.join(syn.out_dir, "eval-*.tar"))
        classes_file = classes_file or os.path.join(syn.out_dir, "classes.json")
        captions = syn.out_dir
    elif data.eval_shards is not None:
        shards = expand_shards(data.eval_shards)
    classes = None
    if classes_file:
        with open(classes_file) as fh:
            classes = json.load(fh)
    tok = data.tokenizer
    cache_dir = os.path.join(exp.trainer.output_dir, "tokenizer")

    def make():
        texts = read_captions(captions, "train") if tok.type == "sentencepiece" and tok.path is None and captions else None
        if tok.type == "sentencepiece" and tok.path is None and texts is None and not os.path.exists(
                os.path.join(cache_dir, f"spm_bpe_{tok.vocab_size}.model")):
            raise ConfigError("data.tokenizer.path is required (the tokenizer the model was trained with)")
        return build_tokenizer(tok.type, tok.path, train_texts=texts, vocab_size=tok.vocab_size, cache_dir=cache_dir)

    if ctx.rank == 0:
        make()
    dist.barrier()
    return shards, classes, make()


def image_folder_batches(root: str, transform, tokenizer, batch_size: int, context_length: int, templates):
    """Batches {"images", "tokens", "class_index"} of an image folder (ROOT/<class>/<image>, classes
    are the sorted sub-folders, names with underscores read as spaces); each image's caption is
    the first template filled with its class name (for retrieval). Returns (batches, classes)."""
    from PIL import Image

    if not os.path.isdir(root):
        raise ConfigError(f"--image-folder {root}: no such directory")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise ConfigError(f"--image-folder {root}: no class sub-folders (expected ROOT/<class>/<image>)")
    names = [f.replace("_", " ").strip() for f in folders]
    files = []
    for index, folder in enumerate(folders):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames.sort()
            files += [(os.path.join(dirpath, f), index) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    template = templates[0]

    def batches():
        chunk = []
        for path, index in files:
            try:
                with Image.open(path) as image:
                    image.load()
                    tensor = transform(image.convert("RGB"))
            except Exception as exc:  # noqa: BLE001 - a broken image is skipped, named
                log.warning("skipped unreadable image %s: %s", path, exc)
                continue
            chunk.append((tensor, template.format(names[index]), index))
            if len(chunk) == batch_size:
                yield _folder_batch(chunk, tokenizer, context_length)
                chunk = []
        if chunk:
            yield _folder_batch(chunk, tokenizer, context_length)

    return batches, {"classnames": names, "templates": list(templates)}


def _folder_batch(chunk, tokenizer, context_length):
    return {"images": torch.stack([c[0] for c in chunk]), "tokens": tokenizer([c[1] for c in chunk], context_length),
            "class_index": torch.tensor([c[2] for c in chunk], dtype=torch.long)}


# ---- model -------------------------------------------------------------------------------------

def build_eval_model(exp, ctx, weights: Weights, vocab_size: int, eot_id: int):
    """This rank's stage of the model, with its weights."""
    from engine.checkpoint import KeyMap, load_model_weights
    from engine.checkpoint.state import Placement
    from engine.precision import plan_precision
    from models.clip.finetune import attach_lora
    from models.clip.model import CLIPModel
    from parallel.pp_sharding import stage_state_from_full
    from parallel.tp_sharding import shard_full_state_dict

    m = exp.model
    if vocab_size > m.text.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens, the model's vocabulary {m.text.vocab_size}: "
                          "use the tokenizer the model was trained with (data.tokenizer.*)")
    m.text.eot_token_id = eot_id
    precision = plan_precision(exp.trainer.precision, m.megatron_amp_O2, ctx.device)
    model = CLIPModel(m, use_cpu_initialization=ctx.device.type == "cpu", sequence_parallel=exp.parallel.sequence_parallel,
                      **precision.transformer_overrides()).to(ctx.device)
    model.to(precision.params_dtype)
    attach_lora(model, m.finetune)
    if weights.kind == "engine":
        key_map = KeyMap(allow_missing=["*.lora.*"]) if weights.adapters else KeyMap()
        load_model_weights(weights.path, model, Placement.from_ctx(ctx), key_map)
        if weights.adapters:
            from models.clip.family import load_adapters

            load_adapters(model, weights.adapters, ctx)
    else:
        stage = stage_state_from_full(weights.full_state, model)
        model.load_state_dict(shard_full_state_dict(stage, model, ctx.tp_rank, ctx.dims.tp))
    model.eval()
    return model


# ---- metrics -----------------------------------------------------------------------------------

def _labelled(images, labels):
    keep = labels >= 0
    return images[keep], labels[keep]


def compute_metrics(images, texts, labels, classes, encode_text, tokenize, options: EvalOptions,
                    probe_train=None) -> dict:
    from engine.evaluation import class_embeddings, retrieval_recall, zero_shot_accuracy
    from models.clip.linear_probe import linear_probe_accuracy

    metrics = {"eval_samples": int(images.shape[0])}
    if classes and labels is not None:
        feats, y = _labelled(images, labels)
        if feats.shape[0]:
            embeds = class_embeddings(encode_text, tokenize, classes["classnames"],
                                      classes.get("templates") or DEFAULT_TEMPLATES).cpu()
            metrics.update(zero_shot_accuracy(feats, y, embeds, attributes=classes.get("attributes")))
            metrics["zero_shot_chance"] = 1.0 / len(classes["classnames"])
    metrics.update(retrieval_recall(images, texts, ks=options.recall_ks))
    if options.linear_probe and labels is not None:
        if probe_train is not None:
            train_x, train_y = probe_train
            test_x, test_y = _labelled(images, labels)
        else:  # even-numbered samples fit the probe, odd-numbered ones test it
            feats, y = _labelled(images, labels)
            train_x, train_y, test_x, test_y = feats[0::2], y[0::2], feats[1::2], y[1::2]
        if train_x.shape[0] and test_x.shape[0]:
            metrics.update(linear_probe_accuracy(train_x, train_y, test_x, test_y))
            metrics["linear_probe_train_samples"] = int(train_x.shape[0])
    return metrics


def format_table(metrics: dict, title: str) -> str:
    rows = [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    width = max([len(k) for k, _ in rows] + [len("metric")])
    lines = [title, f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def evaluate(exp, weights: Weights, options: EvalOptions) -> dict:
    """Collective over the launched processes: initialise the parallel layout of `exp`, build and
    load the model, evaluate, print the table and write the JSON on rank 0. Returns the metrics."""
    from data.pipeline import build_clip_dataloader
    from data.transforms import build_image_transform
    from engine.evaluation import collect_features
    from models.clip.family import pipelined_encoders
    from parallel.context import destroy_parallel, initialize_parallel
    from parallel.p2p import StageLink

    par = exp.parallel
    ctx = initialize_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.device,
                              seed=exp.trainer.seed, timeout_minutes=par.distributed_timeout_minutes)
    try:
        shards, classes, tokenizer = eval_data(exp, ctx)
        model = build_eval_model(exp, ctx, weights, tokenizer.vocab_size, tokenizer.eot_id)
        link = StageLink(ctx.device) if ctx.dims.pp > 1 else None
        encode_image, encode_text = pipelined_encoders(model, link)
        v = model.cfg.vision
        transform = build_image_transform(v.img_h, train=False, mean=v.image_mean, std=v.image_std)
        context = model.cfg.text.encoder_seq_length
        batch_size = exp.eval.batch_size

        def loader(spec):
            return build_clip_dataloader(spec, dp_rank=0, dp_size=1, batch_size=batch_size, tokenizer=tokenizer,
                                         image_transform=transform, context_length=context, shuffle_buffer=0,
                                         seed=0, infinite=False)

        if options.image_folder:
            batches, classes = image_folder_batches(options.image_folder, transform, tokenizer, batch_size, context,
                                                    (classes or {}).get("templates") or DEFAULT_TEMPLATES)
            source = list(batches())
        elif shards:
            source = loader(shards)
        else:
            raise ConfigError("nothing to evaluate: give data.eval_shards (and data.classes_file), --image-folder, "
                              "or no shards at all for the synthetic set")
        images, texts, labels = collect_features(encode_image, encode_text, source, ctx.dp_rank, ctx.dims.dp,
                                                 ctx.dp_group, ctx.device)
        probe_train = None
        if options.linear_probe and options.probe_train_shards:
            probe_images, _, probe_labels = collect_features(encode_image, encode_text, loader(options.probe_train_shards),
                                                             ctx.dp_rank, ctx.dims.dp, ctx.dp_group, ctx.device)
            if probe_labels is None:
                raise ConfigError(f"--probe-train-shards {options.probe_train_shards}: no class_index in the samples' json")
            probe_train = _labelled(probe_images, probe_labels)

        def tokenize(texts_):
            return tokenizer(texts_, context_length=context).to(ctx.device)

        with torch.no_grad():
            metrics = compute_metrics(images, texts, labels, classes, encode_text, tokenize, options, probe_train)
        layout = {"tensor_model_parallel_size": ctx.dims.tp, "pipeline_model_parallel_size": ctx.dims.pp,
                  "data_parallel_size": ctx.dims.dp}
        if ctx.rank == 0:
            print(format_table(metrics, f"{weights.label} at TP={ctx.dims.tp} PP={ctx.dims.pp} DP={ctx.dims.dp}"),
                  flush=True)
            if options.out_json:
                os.makedirs(os.path.dirname(os.path.abspath(options.out_json)), exist_ok=True)
                with open(options.out_json, "w") as fh:
                    json.dump({"weights": weights.label, "layout": layout, **options.extra, "metrics": metrics}, fh,
                              indent=2)
                log.info("wrote %s", options.out_json)
        return metrics
    finally:
        destroy_parallel()
