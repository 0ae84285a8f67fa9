import random

import numpy as np
import pytest
import torch
from PIL import Image

from data.transforms import CLIP_MEAN, CLIP_STD, build_image_transform


def _gradient(width, height):
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.broadcast_to((x + y) / 2, (height, width, 3)).astype(np.uint8), "RGB")


def test_normalisation_uses_clip_statistics():
    image = Image.new("RGB", (40, 40), (255, 0, 128))
    out = build_image_transform(32, train=False)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(out[:, 5, 5], torch.tensor(expected), atol=1e-5)
    custom = build_image_transform(32, train=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(image)
    assert torch.allclose(custom[:, 5, 5], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-5)


def test_eval_resizes_short_side_and_centre_crops():
    image = _gradient(64, 32)  # wide: the crop keeps the middle columns
    out = build_image_transform(16, train=False, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert out.shape == (3, 16, 16)
    reference = np.asarray(image.resize((32, 16), Image.BICUBIC).crop((8, 0, 24, 16)), dtype=np.float32) / 255
    assert torch.allclose(out, torch.from_numpy(reference).permute(2, 0, 1), atol=1e-6)


def test_train_crop_follows_the_rng():
    image = _gradient(48, 48)
    transform = build_image_transform(32, train=True, scale=(0.5, 0.6))
    a = transform(image, random.Random(1))
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, transform(image, random.Random(1)))
    assert not torch.equal(a, transform(image, random.Random(2)))
    # without a caller RNG the transform's own RNG advances: successive crops differ
    assert not torch.equal(transform(image), transform(image))
    with pytest.raises(ValueError, match="scale"):
        build_image_transform(32, train=True, scale=(0.0, 1.0))
