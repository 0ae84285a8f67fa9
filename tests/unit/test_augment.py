"""Augmentation presets on torchvision v2 and on the PIL equivalent (forced, and chosen when the
import fails)."""
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data import augment
from data.augment import TRIVIAL_AUGMENT_OPS, Augmentation, apply_op, random_erase
from data.transforms import CLIP_MEAN, CLIP_STD

SIZE = 32


def _image(size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _normalised(array):
    tensor = torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)
    return (tensor - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("preset", ["simple", "advanced"])
def test_shape_and_determinism(backend, preset):
    aug = Augmentation(preset, SIZE, backend=backend)
    assert aug.backend == backend
    image = _image(48)
    a = aug(image, random.Random(3))
    b = aug(image, random.Random(3))
    assert a.shape == (3, SIZE, SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b)  # the pipeline's rng decides everything
    outputs = {aug(image, random.Random(seed)).numpy().tobytes() for seed in range(8)}
    assert len(outputs) > 1


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_simple_flip_and_padded_crop(backend):
    """flip p=1 and no padding on an image of the model's size: exactly the mirrored image; with
    padding the output is a shifted window of the zero-padded mirror."""
    image = _image()
    mirrored = np.asarray(image)[:, ::-1]
    aug = Augmentation("simple", SIZE, backend=backend, flip_p=1.0, crop_padding=0)
    torch.testing.assert_close(aug(image, random.Random(0)), _normalised(mirrored), atol=1e-6, rtol=0)
    padded = np.zeros((SIZE + 8, SIZE + 8, 3), dtype=np.uint8)
    padded[4:-4, 4:-4] = mirrored
    windows = [_normalised(padded[t:t + SIZE, left:left + SIZE]) for t in range(9) for left in range(9)]
    aug = Augmentation("simple", SIZE, backend=backend, flip_p=1.0, crop_padding=4)
    for seed in range(4):
        out = aug(image, random.Random(seed))
        assert any(torch.allclose(out, w, atol=1e-6) for w in windows)


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_advanced_erases_with_probability(backend):
    image = Image.new("RGB", (SIZE, SIZE), (250, 250, 250))  # nothing normalises to 0 here...
    always = Augmentation("advanced", SIZE, backend=backend, erase_p=1.0)
    never = Augmentation("advanced", SIZE, backend=backend, erase_p=0.0)
    erased = [(always(image, random.Random(s)) == 0).all(0).sum() for s in range(6)]
    assert all(n > 0 for n in erased)  # ...except an erased box
    assert all((never(image, random.Random(s)) == 0).all(0).sum() == 0 for s in range(6))


def test_every_fallback_op_runs():
    low_contrast = np.random.default_rng(0).integers(60, 180, (SIZE, SIZE, 3), dtype=np.uint8)
    image = Image.fromarray(low_contrast)  # so autocontrast and equalize have something to do
    magnitudes = {"ShearX": 0.5, "ShearY": 0.5, "TranslateX": 8, "TranslateY": 8, "Rotate": 30, "Posterize": 2,
                  "Solarize": 0.5}
    for op in TRIVIAL_AUGMENT_OPS:
        out = apply_op(image, op, magnitudes.get(op, 0.8))
        assert out.size == image.size and out.mode == "RGB"
        if op != "Identity":
            assert not np.array_equal(np.asarray(out), np.asarray(image)), op
    box = random_erase(torch.ones(3, 20, 20), random.Random(1))
    zeros = (box == 0).all(0)
    rows, cols = zeros.any(1).nonzero(), zeros.any(0).nonzero()
    assert zeros.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # one rectangle


def test_falls_back_when_torchvision_does_not_import(monkeypatch, caplog):
    def broken():
        raise ImportError("no torchvision")

    monkeypatch.setattr(augment, "_import_v2", broken)
    monkeypatch.setattr(augment, "_warned_fallback", False)
    with caplog.at_level(logging.WARNING):
        aug = Augmentation("advanced", SIZE)
    assert aug.backend == "pil" and "runs on PIL" in caplog.text
    caplog.clear()
    Augmentation("simple", SIZE)
    assert "runs on PIL" not in caplog.text  # warned once per process
    assert aug(_image(), random.Random(0)).shape == (3, SIZE, SIZE)
    with pytest.raises(ImportError, match="torchvision"):
        Augmentation("simple", SIZE, backend="torchvision")


def test_bad_preset():
    with pytest.raises(ValueError, match="preset 'fancy'"):
        Augmentation("fancy", SIZE)
