"""Image transforms for CLIP (PIL + NumPy, no torchvision: it does not install beside the CPU torch).

Training: random resized crop (area `scale`, aspect 3/4..4/3) to the model's size; evaluation:
resize the short side and centre-crop. No horizontal flip: captions name left and right.
Randomness comes from the `rng` the pipeline passes, seeded per data-parallel rank, so the TP ranks
of one replica crop identically.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTransform:
    """PIL image -> normalised float tensor [3, H, W].

    `transform(image, rng)` crops with the caller's `random.Random` (the pipeline passes one seeded
    per rank and worker); without one, the transform's own RNG (seeded with `seed`) is used.
    """

    def __init__(self, image_size: int, train: bool, mean=None, std=None, scale=(0.9, 1.0),
                 ratio=(3 / 4, 4 / 3), seed: int = 0):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"random crop scale {scale}: need 0 < low <= high <= 1")
        self.image_size, self.train = image_size, train
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.mean = torch.tensor(CLIP_MEAN if mean is None else tuple(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD if std is None else tuple(std), dtype=torch.float32).view(3, 1, 1)
        self.rng = random.Random(seed)

    def _crop_box(self, width: int, height: int, rng: random.Random):
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                return left, top, left + w, top + h
        side = min(width, height)  # fall back to a centre crop
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        image = image.convert("RGB")
        size = self.image_size
        if self.train:
            box = self._crop_box(image.width, image.height, rng if rng is not None else self.rng)
            image = image.resize((size, size), Image.BICUBIC, box=box)
        else:
            scale = size / min(image.width, image.height)
            w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((w, h), Image.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        return (tensor - self.mean) / self.std


def build_image_transform(image_size: int, train: bool, mean=None, std=None, scale=(0.9, 1.0)) -> ImageTransform:
    return ImageTransform(image_size, train, mean=mean, std=std, scale=scale)
