"""A synthetic compositional image-caption set written as WebDataset shards.

Each image is one shape with a colour, a size and a position; its caption says so in words. The
zero-shot classes are (colour, shape) pairs. A fixed third of the pairs is held out of the
training shards, chosen so every colour and every shape still appears in training: a model that
scores on them has learnt to compose attributes, not to memorise pairs. Deterministic from a seed
(same seed -> byte-identical tar files).

    python -m data.synthetic --out data_cache/shapes --num-train 20000 --num-eval 1000
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import math
import os
import random
import tarfile

from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]
COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220),
    "yellow": (235, 210, 30), "purple": (140, 50, 180), "orange": (245, 140, 20),
}
SIZES = {"small": 0.22, "large": 0.42}  # shape radius as a fraction of the image side
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}
BACKGROUNDS = [(245, 245, 245), (225, 225, 225), (200, 200, 200), (235, 230, 220), (215, 220, 230)]
# How each position reads in a sentence ("on the left", "at the top", "in the center").
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": "in the center"}
CAPTION_TEMPLATES = [
    "a {size} {color} {shape} {where}",
    "a photo of a {size} {color} {shape} {where}",
    "a {color} {shape}, {size}, {where}",
    "there is a {size} {color} {shape} {where} of the image",
    "{size} {color} {shape} {where}",
    "a picture of a {color} {shape} {where}; it is {size}",
    # Captions that name only colour and shape, like the zero-shot prompts: between two of them size
    # and position cannot tell the images apart, so the contrastive loss has to learn the shape.
    # Without them the demo's held-out shape accuracy stayed at the 0.5 colour alone gives.
    "a {color} {shape}",
    "a photo of a {color} {shape}.",
    "a drawing of a {color} {shape}.",
    "an image of a {color} {shape}.",
]
FORMAT_VERSION = 3
PROMPT_TEMPLATES = ["a photo of a {}.", "a {}.", "a drawing of a {}.", "an image of a {}.", "a small {}.",
                    "a large {}."]


def held_out_pairs() -> list[tuple[str, str]]:
    """12 of the 36 (colour, shape) pairs: two shapes per colour on a cyclic shift (a Latin design),
    so each colour and each shape is held out exactly twice and still appears four times in training."""
    colors = list(COLORS)
    return [(colors[i], SHAPES[(i + k) % len(SHAPES)]) for i in range(len(colors)) for k in (0, 3)]


def train_pairs() -> list[tuple[str, str]]:
    held = set(held_out_pairs())
    return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in held]


def class_name(color: str, shape: str) -> str:
    return f"{color} {shape}"


def _shape_points(shape: str, cx: float, cy: float, r: float):
    if shape == "triangle":
        return [(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    raise ValueError(shape)


def render(shape: str, color: str, size: str, position: str, image_size: int, rng: random.Random) -> Image.Image:
    background = tuple(max(0, min(255, c + rng.randint(-8, 8))) for c in rng.choice(BACKGROUNDS))
    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[position]
    jitter = 0.04 * image_size
    cx = fx * image_size + rng.uniform(-jitter, jitter)
    cy = fy * image_size + rng.uniform(-jitter, jitter)
    draw_shape(draw, shape, color, size, cx, cy, image_size, rng)
    return img


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, size: str, cx: float, cy: float, image_size: int,
               rng: random.Random) -> None:
    """One shape centred at (cx, cy): radius and colour jittered from `rng`. The VQA set
    (data/vlm_synthetic.py) draws its shapes with this too, so a CLIP tower trained on these images
    sees the same shapes there."""
    r = SIZES[size] * image_size * rng.uniform(0.9, 1.1) / 2
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=fill)


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.uid, info.gid, info.mode = len(payload), 0, 0, 0, 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _write_split(out_dir: str, split: str, pairs, num: int, image_size: int, per_shard: int, seed: int,
                 class_index: dict) -> list[dict]:
    rng = random.Random(f"{seed}-{split}")
    shards = []
    for shard_id, start in enumerate(range(0, num, per_shard)):
        path = os.path.join(out_dir, f"{split}-{shard_id:06d}.tar")
        count = min(per_shard, num - start)
        tmp = path + ".tmp"
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, start + count):
                color, shape = rng.choice(pairs)
                size, position = rng.choice(list(SIZES)), rng.choice(list(POSITIONS))
                img = render(shape, color, size, position, image_size, rng)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                caption = rng.choice(CAPTION_TEMPLATES).format(size=size, color=color, shape=shape,
                                                               where=POSITION_PHRASES[position])
                meta = {"shape": shape, "color": color, "size": size, "position": position,
                        "class_name": class_name(color, shape), "class_index": class_index.get((color, shape), -1)}
                key = f"{split}{i:08d}"
                _add_member(tar, f"{key}.jpg", buf.getvalue())
                _add_member(tar, f"{key}.txt", caption.encode())
                _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        os.replace(tmp, path)  # a shard appears whole or not at all
        shards.append({"path": os.path.basename(path), "samples": count})
    return shards


def generate_shapes_dataset(out_dir: str, num_train: int = 20000, num_eval: int = 1000, image_size: int = 64,
                            samples_per_shard: int = 1000, seed: int = 0) -> dict:
    """Write train/eval shards, classes.json and manifest.json into `out_dir`; return the manifest.

    Each sample is `<key>.jpg`, `<key>.txt` (caption) and `<key>.json` ({shape, color, size,
    position, class_name, class_index}); class_index indexes classes.json "classnames" (the held-out
    pairs) for eval samples and is -1 for train samples, whose pairs are not zero-shot classes.
    Skips the work when a manifest with the same parameters and all its shards are already there.
    """
    # FORMAT_VERSION changes whenever the written content changes (captions, classes.json), so an
    # older cache is rewritten instead of reused.
    params = {"num_train": num_train, "num_eval": num_eval, "image_size": image_size,
              "samples_per_shard": samples_per_shard, "seed": seed, "format_version": FORMAT_VERSION}
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as fh:
            manifest = json.load(fh)
        shards = [s["path"] for split in ("train", "eval") for s in manifest.get(split, [])]
        complete = all(os.path.exists(os.path.join(out_dir, p)) for p in shards)
        if manifest.get("params") == params and complete:
            log.info("synthetic shapes data already in %s (%s); not regenerating", out_dir, params)
            return manifest
        log.info("regenerating synthetic shapes data in %s: %s", out_dir,
                 "shards are missing" if manifest.get("params") == params else "parameters changed")
        # Old shards would otherwise be picked up by a 'train-*.tar' pattern next to the new ones.
        os.remove(manifest_path)
        for old in glob.glob(os.path.join(out_dir, "train-*.tar")) + glob.glob(os.path.join(out_dir, "eval-*.tar")):
            os.remove(old)
    os.makedirs(out_dir, exist_ok=True)
    held = held_out_pairs()
    class_index = {pair: i for i, pair in enumerate(held)}
    log.info("writing synthetic shapes data to %s (%d train, %d eval)", out_dir, num_train, num_eval)
    train = _write_split(out_dir, "train", train_pairs(), num_train, image_size, samples_per_shard, seed, {})
    evals = _write_split(out_dir, "eval", held, num_eval, image_size, samples_per_shard, seed, class_index)
    manifest = {"params": params, "image_size": image_size, "seed": seed,
                "num_samples": {"train": num_train, "eval": num_eval}, "train": train, "eval": evals}
    # "attributes" lets the evaluation report colour and shape accuracy apart: with two held-out
    # shapes per colour, knowing the colour alone already gives 0.5 top-1 over the held-out classes.
    classes = {"classnames": [class_name(c, s) for c, s in held], "templates": PROMPT_TEMPLATES,
               "train_classnames": [class_name(c, s) for c, s in train_pairs()],
               "attributes": {"color": [c for c, _ in held], "shape": [s for _, s in held]}}
    with open(os.path.join(out_dir, "classes.json"), "w") as fh:
        json.dump(classes, fh, indent=1)
    with open(manifest_path + ".tmp", "w") as fh:
        json.dump(manifest, fh, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)  # written last: its presence means complete
    return manifest


def read_captions(out_dir: str, split: str = "train") -> list[str]:
    """All captions of a split (to train a tokenizer on)."""
    with open(os.path.join(out_dir, "manifest.json")) as fh:
        manifest = json.load(fh)
    captions = []
    for shard in manifest[split]:
        with tarfile.open(os.path.join(out_dir, shard["path"])) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".txt"):
                    captions.append(tar.extractfile(member).read().decode())
    return captions


def load_classes(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "classes.json")) as fh:
        return json.load(fh)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--num-eval", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    manifest = generate_shapes_dataset(args.out, args.num_train, args.num_eval, args.image_size,
                                       args.samples_per_shard, args.seed)
    print(json.dumps({split: {"shards": len(manifest[split]), "samples": manifest["num_samples"][split]}
                      for split in ("train", "eval")}))


if __name__ == "__main__":
    main()
