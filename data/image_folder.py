"""Write WebDataset shards and a zero-shot class list from an image folder with one sub-folder per
class (the layout torchvision's `ImageFolder` reads):

    ROOT/cat/001.jpg  ROOT/cat/002.png  ROOT/dog/xyz.jpeg ...

    python -m data.image_folder ROOT --out shards/ --eval-fraction 0.1 --caption-template 'a photo of a {}.'

writes `shards/train-000000.tar ...`, `shards/eval-000000.tar ...` (each sample `<key>.jpg`,
`<key>.txt` the caption, `<key>.json` {class_index, class_name, key, source}), `classes.json`
({"classnames", "templates", "folders"}) and `manifest.json` (counts, skipped files). Class indices
follow the sorted sub-folder names, as `ImageFolder`'s `class_to_idx`; class names are the folder
names with underscores read as spaces. The train/eval split is per class and deterministic from
`--seed`; unreadable images are skipped and named. An existing non-empty `--out` is refused, and
the output appears whole or not at all (written next to it, then renamed).
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import os
import random
import shutil
import sys
import tarfile

from PIL import Image

log = logging.getLogger(__name__)

# The extensions torchvision's ImageFolder accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_CAPTION = "a photo of a {}."


def find_classes(root: str) -> list[str]:
    """Sorted names of the sub-folders of `root` (hidden ones skipped), as ImageFolder."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such directory")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} has no class sub-folders (expected ROOT/<class>/<image>)")
    return folders


def list_images(folder: str) -> list[str]:
    """Image files under `folder` (recursively, sorted), by extension."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def class_name(folder: str) -> str:
    return folder.replace("_", " ").strip()


def _check_template(template: str, option: str) -> None:
    if template.count("{}") != 1:
        raise ValueError(f"{option} {template!r}: needs exactly one '{{}}' where the class name goes")


def split_files(files: list[str], eval_fraction: float, seed: int, label: str) -> tuple[list[str], list[str]]:
    """(train, eval) for one class: a seeded shuffle, `round(n * eval_fraction)` to eval, at least
    one image left for training."""
    order = list(files)
    random.Random(f"{seed}-{label}").shuffle(order)
    n_eval = min(round(len(order) * eval_fraction), max(0, len(order) - 1))
    return order[n_eval:], order[:n_eval]


def encode_image(path: str, image_size: int | None) -> bytes:
    """JPEG bytes of `path`: a JPEG that needs no resize is kept as it is; anything else is decoded,
    put on white if it has transparency, resized so the short side is `image_size` (never
    enlarged) and re-encoded. Raises on a file that does not decode."""
    image = Image.open(path)  # from the path, so PIL's error names the file
    image.load()  # a truncated or corrupt file fails here, not later in training
    needs_resize = image_size is not None and min(image.size) > image_size
    if image.format == "JPEG" and image.mode in ("RGB", "L") and not needs_resize:
        with open(path, "rb") as fh:
            return fh.read()
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert("RGB")
    if needs_resize:
        scale = image_size / min(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    tar.addfile(info, io.BytesIO(payload))


def _readable(samples, root: str, image_size: int | None, split: str, skipped: list[dict]):
    """(jpeg bytes, path, class index) of each sample that decodes; the others are named in `skipped`."""
    for path, index in samples:
        try:
            yield encode_image(path, image_size), path, index
        except Exception as exc:  # noqa: BLE001 - any file PIL cannot read is skipped, not fatal
            skipped.append({"file": os.path.relpath(path, root), "split": split,
                            "error": f"{type(exc).__name__}: {exc}"})
            log.warning("skipped unreadable image %s: %s: %s", path, type(exc).__name__, exc)


def _write_split(out_dir: str, split: str, samples: list[tuple[str, int]], root: str, folders: list[str],
                 captions: list[str], per_shard: int, image_size: int | None, seed: int,
                 skipped: list[dict]) -> list[dict]:
    """Shards of one split from (path, class index) pairs, in the order given."""
    rng = random.Random(f"{seed}-{split}-captions")
    readable = _readable(samples, root, image_size, split, skipped)
    shards, written = [], 0
    while chunk := list(itertools.islice(readable, per_shard)):
        name = f"{split}-{len(shards):06d}.tar"
        with tarfile.open(os.path.join(out_dir, name), "w", format=tarfile.USTAR_FORMAT) as tar:
            for jpg, path, index in chunk:
                key = f"{split}{written:08d}"
                label = class_name(folders[index])
                meta = {"class_index": index, "class_name": label, "key": key, "source": os.path.relpath(path, root)}
                _add_member(tar, f"{key}.jpg", jpg)
                _add_member(tar, f"{key}.txt", rng.choice(captions).format(label).encode())
                _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                written += 1
        shards.append({"path": name, "samples": len(chunk)})
    return shards


def write_image_folder_shards(root: str, out_dir: str, eval_fraction: float = 0.1, samples_per_shard: int = 1000,
                              caption_templates: list[str] | None = None, prompt_templates: list[str] | None = None,
                              image_size: int | None = None, seed: int = 0) -> dict:
    """Write shards, classes.json and manifest.json for the image folder `root`; return the manifest."""
    captions = list(caption_templates or [DEFAULT_CAPTION])
    templates = list(prompt_templates or captions)
    for template in captions:
        _check_template(template, "--caption-template")
    for template in templates:
        _check_template(template, "--prompt-template")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"--eval-fraction {eval_fraction}: must be in [0, 1)")
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard {samples_per_shard}: must be at least 1")
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size {image_size}: must be at least 1")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"--out {out_dir} exists and is not empty; choose a new directory (nothing was written)")
    folders = find_classes(root)
    per_class = {folder: list_images(os.path.join(root, folder)) for folder in folders}
    empty = [f for f, files in per_class.items() if not files]
    if empty:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folder(s) "
                         f"{', '.join(os.path.join(root, f) for f in empty)}")
    train, evals = [], []
    for index, folder in enumerate(folders):
        t, e = split_files(per_class[folder], eval_fraction, seed, folder)
        train += [(p, index) for p in t]
        evals += [(p, index) for p in e]
    # Classes mixed across shards: a shuffle buffer then sees every class, not one class per shard.
    random.Random(f"{seed}-train").shuffle(train)
    random.Random(f"{seed}-eval").shuffle(evals)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(parent, f".{os.path.basename(os.path.abspath(out_dir))}.tmp{os.getpid()}")
    os.makedirs(tmp_dir)
    try:
        skipped: list[dict] = []
        train_shards = _write_split(tmp_dir, "train", train, root, folders, captions, samples_per_shard,
                                    image_size, seed, skipped)
        eval_shards = _write_split(tmp_dir, "eval", evals, root, folders, captions, samples_per_shard,
                                   image_size, seed, skipped)
        if not train_shards:
            raise ValueError(f"no readable image in {root} ({len(skipped)} unreadable)")
        classes = {"classnames": [class_name(f) for f in folders], "templates": templates, "folders": folders}
        manifest = {
            "root": os.path.abspath(root),
            "params": {"eval_fraction": eval_fraction, "samples_per_shard": samples_per_shard,
                       "caption_templates": captions, "image_size": image_size, "seed": seed},
            "num_samples": {"train": sum(s["samples"] for s in train_shards),
                            "eval": sum(s["samples"] for s in eval_shards)},
            "train": train_shards, "eval": eval_shards, "skipped": skipped,
        }
        with open(os.path.join(tmp_dir, "classes.json"), "w") as fh:
            json.dump(classes, fh, indent=1)
        with open(os.path.join(tmp_dir, "manifest.json"), "w") as fh:
            json.dump(manifest, fh, indent=1)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above): the finished directory takes its place
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


def shard_pattern(out_dir: str, split: str, count: int) -> str:
    """The brace pattern naming `count` shards of `split` (quote it on a command line)."""
    if count == 1:
        return os.path.join(out_dir, f"{split}-000000.tar")
    return os.path.join(out_dir, f"{split}-{{000000..{count - 1:06d}}}.tar")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.image_folder", description=__doc__.split("\n\n")[0],
                                     epilog="Brace patterns such as 'dir/train-{000000..000009}.tar' must be quoted "
                                            "on the command line.")
    parser.add_argument("root", help="a folder with one sub-folder of images per class")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--eval-fraction", type=float, default=0.1,
                        help="share of each class's images written to eval-*.tar (default 0.1; 0: no eval shards)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--caption-template", action="append", default=None,
                        help=f"caption for each image, '{{}}' is the class name (default {DEFAULT_CAPTION!r}); "
                             "repeat to draw one at random per image")
    parser.add_argument("--prompt-template", action="append", default=None,
                        help="zero-shot prompt for classes.json (repeatable; default: the caption templates)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize so the short side is at most this (default: keep the size)")
    parser.add_argument("--seed", type=int, default=0, help="the train/eval split and the shard order")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = write_image_folder_shards(args.root, args.out, args.eval_fraction, args.samples_per_shard,
                                             args.caption_template, args.prompt_template, args.image_size, args.seed)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    out = args.out.rstrip("/")
    train = shard_pattern(out, "train", len(manifest["train"]))
    counts = manifest["num_samples"]
    print(f"wrote {len(manifest['train'])} train shard(s) ({counts['train']} images), {len(manifest['eval'])} eval "
          f"shard(s) ({counts['eval']} images), {out}/classes.json; skipped {len(manifest['skipped'])} unreadable "
          "image(s)" + "".join(f"\n  skipped {s['file']}: {s['error']}" for s in manifest["skipped"]))
    keys = [f"data.train_shards='{train}'"]
    if manifest["eval"]:
        keys.append(f"data.eval_shards='{shard_pattern(out, 'eval', len(manifest['eval']))}'")
    keys += [f"data.classes_file={out}/classes.json", "data.tokenizer.path=tokenizer/spm.model"]
    print(f"next: python -m data.train_tokenizer '{train}' --out tokenizer/spm.model\n"
          f"then: torchrun --nproc_per_node=N examples/pretrain_clip.py {' '.join(keys)}")


if __name__ == "__main__":
    main()
