"""Training augmentation presets for fine-tuning (the seed's `simple` and `advanced`).

- simple: resize to the model's size, random horizontal flip, random crop with zero padding;
- advanced: resize, TrivialAugmentWide (one random op of 14 at a random magnitude), then
  RandomErasing (p = 0.2) on the normalised tensor.

torchvision's transforms v2 run them where it imports; otherwise (the CPU-only torch of the quick
start has no torchvision) an equivalent written on PIL and NumPy runs, with the same op list,
magnitude ranges and erasing rule as torchvision's. Randomness comes from the `rng` the pipeline
passes (seeded per DP rank and worker, saved in checkpoints), for both backends: torchvision's
draws run under a forked torch RNG seeded from it.

Mind that a flip swaps left and right: captions that name them become wrong (the synthetic shapes
set's captions do, "on the left"; the default pretraining transform has no flip for that reason).
"""
from __future__ import annotations

import logging
import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from data.transforms import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)

PRESETS = ("simple", "advanced")
BACKENDS = ("auto", "torchvision", "pil")
TRIVIAL_AUGMENT_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
_BINS = 31  # torchvision's num_magnitude_bins
_warned_fallback = False


def _import_v2():
    from torchvision.transforms import v2

    return v2


def torchvision_v2():
    """torchvision.transforms.v2, or None where torchvision does not import."""
    try:
        return _import_v2()
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return None


class Augmentation:
    """PIL image -> normalised float tensor [3, size, size]; `augment(image, rng)` as `ImageTransform`."""

    takes_rng = True  # the data pipeline passes its stream RNG (reproducible, restored on resume)

    def __init__(self, preset: str, image_size: int, mean=None, std=None, backend: str = "auto",
                 crop_padding: int = 4, flip_p: float = 0.5, erase_p: float = 0.2, seed: int = 0):
        if preset not in PRESETS:
            raise ValueError(f"augmentation preset {preset!r}: use one of {', '.join(PRESETS)}")
        if backend not in BACKENDS:
            raise ValueError(f"augmentation backend {backend!r}: use one of {', '.join(BACKENDS)}")
        v2 = torchvision_v2() if backend in ("auto", "torchvision") else None
        if backend == "torchvision" and v2 is None:
            raise ImportError("augmentation backend torchvision requested but torchvision.transforms.v2 does not import")
        global _warned_fallback
        if backend == "auto" and v2 is None and not _warned_fallback:
            log.warning("torchvision.transforms.v2 does not import: the %s augmentation runs on PIL", preset)
            _warned_fallback = True
        self.backend = "torchvision" if v2 is not None else "pil"
        self.preset, self.size = preset, image_size
        self.crop_padding, self.flip_p, self.erase_p = crop_padding, flip_p, erase_p
        self.mean = torch.tensor(CLIP_MEAN if mean is None else tuple(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD if std is None else tuple(std), dtype=torch.float32).view(3, 1, 1)
        self.rng = random.Random(seed)
        self._pipeline = self._torchvision_pipeline(v2) if v2 is not None else None

    def _torchvision_pipeline(self, v2):
        size = (self.size, self.size)
        steps = [v2.ToImage(), v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
        if self.preset == "simple":
            steps += [v2.RandomHorizontalFlip(self.flip_p), v2.RandomCrop(self.size, padding=self.crop_padding)]
        else:
            steps += [v2.TrivialAugmentWide()]
        steps += [v2.ToDtype(torch.float32, scale=True),
                  v2.Normalize(self.mean.flatten().tolist(), self.std.flatten().tolist())]
        if self.preset == "advanced":
            steps.append(v2.RandomErasing(p=self.erase_p, value=0))
        return v2.Compose(steps)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng if rng is not None else self.rng
        image = image.convert("RGB")
        if self._pipeline is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng.getrandbits(63))
                return self._pipeline(image)
        image = image.resize((self.size, self.size), Image.BICUBIC)
        if self.preset == "simple":
            if rng.random() < self.flip_p:
                image = ImageOps.mirror(image)
            image = random_crop_with_padding(image, self.size, self.crop_padding, rng)
        else:
            image = trivial_augment_wide(image, rng)
        tensor = (to_tensor(image) - self.mean) / self.std
        if self.preset == "advanced" and rng.random() < self.erase_p:
            tensor = random_erase(tensor, rng)
        return tensor


def build_augmentation(preset: str, image_size: int, mean=None, std=None, **kwargs) -> Augmentation:
    return Augmentation(preset, image_size, mean=mean, std=std, **kwargs)


# ---- the PIL equivalent ------------------------------------------------------------------------

def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def random_crop_with_padding(image: Image.Image, size: int, padding: int, rng: random.Random) -> Image.Image:
    if padding > 0:
        padded = Image.new(image.mode, (image.width + 2 * padding, image.height + 2 * padding))
        padded.paste(image, (padding, padding))
        image = padded
    left = rng.randint(0, image.width - size)
    top = rng.randint(0, image.height - size)
    return image.crop((left, top, left + size, top + size))


def _magnitude(op: str, bin_index: int) -> float:
    """torchvision's TrivialAugmentWide magnitudes (`_AUGMENTATION_SPACE`), bin 0..30."""
    t = bin_index / (_BINS - 1)
    if op in ("ShearX", "ShearY", "Brightness", "Color", "Contrast", "Sharpness"):
        return 0.99 * t
    if op in ("TranslateX", "TranslateY"):
        return 32.0 * t
    if op == "Rotate":
        return 135.0 * t
    if op == "Posterize":
        return float(round(8 - bin_index / ((_BINS - 1) / 6)))
    if op == "Solarize":
        return 1.0 - t
    return 0.0


_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


def apply_op(image: Image.Image, op: str, magnitude: float) -> Image.Image:
    """One TrivialAugmentWide op on a PIL RGB image (fill black, nearest resampling as torchvision)."""
    if op == "Identity":
        return image
    if op == "ShearX":
        return image.transform(image.size, Image.AFFINE, (1, magnitude, 0, 0, 1, 0), Image.NEAREST, fillcolor=0)
    if op == "ShearY":
        return image.transform(image.size, Image.AFFINE, (1, 0, 0, magnitude, 1, 0), Image.NEAREST, fillcolor=0)
    if op == "TranslateX":
        return image.transform(image.size, Image.AFFINE, (1, 0, -int(magnitude), 0, 1, 0), Image.NEAREST, fillcolor=0)
    if op == "TranslateY":
        return image.transform(image.size, Image.AFFINE, (1, 0, 0, 0, 1, -int(magnitude)), Image.NEAREST, fillcolor=0)
    if op == "Rotate":
        return image.rotate(magnitude, resample=Image.NEAREST, fillcolor=0)
    if op == "Brightness":
        return ImageEnhance.Brightness(image).enhance(1.0 + magnitude)
    if op == "Color":
        return ImageEnhance.Color(image).enhance(1.0 + magnitude)
    if op == "Contrast":
        return ImageEnhance.Contrast(image).enhance(1.0 + magnitude)
    if op == "Sharpness":
        return ImageEnhance.Sharpness(image).enhance(1.0 + magnitude)
    if op == "Posterize":
        return ImageOps.posterize(image, int(magnitude))
    if op == "Solarize":
        return ImageOps.solarize(image, threshold=int(255 * magnitude))
    if op == "AutoContrast":
        return ImageOps.autocontrast(image)
    if op == "Equalize":
        return ImageOps.equalize(image)
    raise ValueError(f"unknown TrivialAugmentWide op {op!r}")


def trivial_augment_wide(image: Image.Image, rng: random.Random) -> Image.Image:
    op = TRIVIAL_AUGMENT_OPS[rng.randrange(len(TRIVIAL_AUGMENT_OPS))]
    magnitude = _magnitude(op, rng.randrange(_BINS))
    if op in _SIGNED and rng.random() < 0.5:
        magnitude = -magnitude
    return apply_op(image, op, magnitude)


def random_erase(tensor: torch.Tensor, rng: random.Random, scale=(0.02, 0.33), ratio=(0.3, 3.3),
                 value: float = 0.0) -> torch.Tensor:
    """torchvision's RandomErasing rule: up to 10 tries at a box of area `scale`, aspect `ratio`."""
    _, height, width = tensor.shape
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        erase_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        h, w = round(math.sqrt(erase_area * aspect)), round(math.sqrt(erase_area / aspect))
        if h < height and w < width:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            out = tensor.clone()
            out[:, top:top + h, left:left + w] = value
            return out
    return tensor
