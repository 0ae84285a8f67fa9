import hashlib
import io
import logging
import tarfile
from collections import Counter

import pytest
import torch

from data.pipeline import build_clip_dataloader, expand_shards, split_shards_for_dp
from data.synthetic import generate_shapes_dataset, read_captions
from data.tokenizers import build_tokenizer, eot_positions
from data.transforms import build_image_transform

NUM_TRAIN, PER_SHARD = 240, 40


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(str(out), num_train=NUM_TRAIN, num_eval=40, image_size=32, samples_per_shard=PER_SHARD)
    return out


@pytest.fixture(scope="module")
def tokenizer(shards, tmp_path_factory):
    return build_tokenizer("sentencepiece", None, read_captions(str(shards)), 200, str(tmp_path_factory.mktemp("tok")))


def _loader(spec, tokenizer, dp_rank=0, dp_size=1, infinite=False, batch_size=16, seed=0, shuffle=0, train=False,
            num_workers=0):
    return build_clip_dataloader(spec, dp_rank=dp_rank, dp_size=dp_size, batch_size=batch_size,
                                 tokenizer=tokenizer, image_transform=build_image_transform(32, train=train),
                                 context_length=24, shuffle_buffer=shuffle, seed=seed, infinite=infinite,
                                 num_workers=num_workers)


def _fingerprints(loader):
    """One hash per sample (image and tokens); with the eval transform these identify samples."""
    return Counter(hashlib.sha1(img.numpy().tobytes() + tok.numpy().tobytes()).hexdigest()
                   for batch in loader for img, tok in zip(batch["images"], batch["tokens"]))


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_expand_shards_forms(shards):
    brace = expand_shards(str(shards / "train-{000000..000005}.tar"))
    assert brace == expand_shards(str(shards / "train-*.tar")) and len(brace) == 6
    assert expand_shards([brace[0], str(shards / "eval-*.tar")]) == [brace[0], str(shards / "eval-000000.tar")]
    assert len(expand_shards(str(shards))) == 7  # directory: train + eval shards
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_shards(str(shards / "nothing-*.tar"))


@pytest.mark.parametrize("dp_size", [2, 3])
def test_dp_ranks_get_disjoint_samples_covering_all(shards, tokenizer, dp_size):
    spec = str(shards / "train-*.tar")
    per_rank = [split_shards_for_dp(expand_shards(spec), r, dp_size) for r in range(dp_size)]
    flat = [s for shards_ in per_rank for s in shards_]
    assert sorted(flat) == expand_shards(spec) and len(set(flat)) == len(flat)
    everything = _fingerprints(_loader(spec, tokenizer, batch_size=32))
    assert sum(everything.values()) == NUM_TRAIN
    union = Counter()
    seen = []
    for rank in range(dp_size):
        loader = _loader(spec, tokenizer, rank, dp_size, batch_size=32)
        prints = _fingerprints(loader)
        assert loader.stats.samples_seen == sum(prints.values()) == NUM_TRAIN // dp_size
        seen.append(set(prints))
        union += prints
    assert union == everything  # every sample exactly once over the ranks
    assert all(not (seen[i] & seen[j]) for i in range(dp_size) for j in range(i + 1, dp_size))


def test_same_dp_rank_sees_same_samples(shards, tokenizer):
    """TP/PP ranks of one replica pass the same dp_rank and seed: identical training batches."""
    spec = str(shards / "train-*.tar")
    a = iter(_loader(spec, tokenizer, 1, 2, infinite=True, seed=5, shuffle=30, train=True))
    b = iter(_loader(spec, tokenizer, 1, 2, infinite=True, seed=5, shuffle=30, train=True))
    for _ in range(3):
        x, y = next(a), next(b)
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["tokens"], y["tokens"])


def test_bad_dp_split(shards):
    with pytest.raises(ValueError, match="1 shards cannot be split over 2"):
        split_shards_for_dp([str(shards / "eval-000000.tar")], 0, 2)
    with pytest.raises(ValueError, match="dp_rank=2"):
        split_shards_for_dp(expand_shards(str(shards)), 2, 2)


def test_corrupt_and_missing_shards_are_skipped_and_counted(shards, tokenizer, tmp_path, caplog):
    good = shards / "train-000001.tar"
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes((shards / "train-000000.tar").read_bytes()[:5000])
    missing = tmp_path / "missing.tar"
    with caplog.at_level(logging.WARNING, logger="data.pipeline"):
        loader = _loader([str(truncated), str(missing), str(good)], tokenizer, batch_size=8)
        prints = _fingerprints(loader)
    assert loader.stats.shards_skipped == 2
    good_prints = _fingerprints(_loader([str(good)], tokenizer, batch_size=8))
    assert sum(good_prints.values()) == PER_SHARD
    assert not good_prints - prints  # every sample of the good shard came through
    assert sum(prints.values()) - PER_SHARD <= 2  # plus at most the whole samples before the cut
    assert loader.stats.samples_seen == sum(prints.values())
    assert "truncated.tar" in caplog.text and "missing.tar" in caplog.text


def test_all_shards_bad_raises(tokenizer, tmp_path):
    (tmp_path / "garbage.tar").write_bytes(b"\x00garbage" * 100)
    bad = [str(tmp_path / "gone-a.tar"), str(tmp_path / "garbage.tar")]
    with pytest.raises(RuntimeError, match="no readable sample.*gone-a.tar.*garbage.tar|garbage.tar.*gone-a.tar"):
        next(iter(_loader(bad, tokenizer, infinite=True)))
    # shards that read but hold no image/caption pairs are just as unusable
    _write_tar(tmp_path / "wrong.tar", [("x.png_", b"..."), ("x.md", b"hello")])
    with pytest.raises(RuntimeError, match="wrong.tar"):
        next(iter(_loader([str(tmp_path / "wrong.tar")], tokenizer, infinite=True)))


def test_corrupt_image_sample_is_skipped(shards, tokenizer, tmp_path, caplog):
    path = tmp_path / "badimg.tar"
    _write_tar(path, [("x.jpg", b"not a jpeg"), ("x.txt", b"a red circle"), ("y.txt", b"no image")])
    with caplog.at_level(logging.WARNING, logger="data.pipeline"):
        loader = _loader([str(path), str(shards / "train-000002.tar")], tokenizer, batch_size=8)
        n = sum(b["images"].shape[0] for b in loader)
    assert n == PER_SHARD and loader.stats.samples_skipped == 2
    assert "badimg.tar:x" in caplog.text and "badimg.tar:y" in caplog.text


def test_batches_shapes_and_determinism(shards, tokenizer):
    spec = str(shards / "train-*.tar")
    a = _loader(spec, tokenizer, infinite=True, seed=3, shuffle=50, train=True)
    b = _loader(spec, tokenizer, infinite=True, seed=3, shuffle=50, train=True)
    batch_a, batch_b = next(iter(a)), next(iter(b))
    assert batch_a["images"].shape == (16, 3, 32, 32) and batch_a["images"].dtype == torch.float32
    assert batch_a["tokens"].shape == (16, 24) and batch_a["tokens"].dtype == torch.long
    assert (batch_a["tokens"][:, 0] == tokenizer.sot_id).all()
    assert (eot_positions(batch_a["tokens"], tokenizer.eot_id) > 1).all()
    assert torch.equal(batch_a["images"], batch_b["images"]) and torch.equal(batch_a["tokens"], batch_b["tokens"])
    other = next(iter(_loader(spec, tokenizer, infinite=True, seed=4, shuffle=50, train=True)))
    assert not torch.equal(other["tokens"], batch_a["tokens"])
    unshuffled = next(iter(_loader(spec, tokenizer, infinite=True, seed=3, shuffle=0, train=True)))
    assert not torch.equal(unshuffled["tokens"], batch_a["tokens"])


def test_infinite_loader_crosses_epochs_and_reshuffles(shards, tokenizer):
    loader = _loader(str(shards / "train-00000[01].tar"), tokenizer, infinite=True, batch_size=16, shuffle=20)
    it = iter(loader)
    batches = [next(it) for _ in range(10)]  # 160 samples from 80: two epochs
    assert all(b["images"].shape[0] == 16 for b in batches)
    assert loader.stats.samples_seen == 160
    first = torch.cat([b["tokens"] for b in batches[:5]])
    second = torch.cat([b["tokens"] for b in batches[5:]])
    assert not torch.equal(first, second)  # a different order in the second epoch


def test_eval_keeps_last_partial_batch_and_labels(shards, tokenizer):
    loader = _loader(str(shards / "eval-*.tar"), tokenizer, batch_size=16)
    batches = list(loader)
    assert [b["images"].shape[0] for b in batches] == [16, 16, 8]
    labels = torch.cat([b["class_index"] for b in batches])
    assert labels.dtype == torch.long and labels.min() >= 0 and labels.max() < 12
    assert loader.stats.samples_seen == 40


def test_training_drops_partial_batch(shards, tokenizer):
    it = iter(_loader(str(shards / "eval-*.tar"), tokenizer, infinite=True, batch_size=16))
    assert [next(it)["images"].shape[0] for _ in range(5)] == [16] * 5  # 40 per epoch, no 8-sample batch


def test_plain_callable_transform(shards, tokenizer):
    def transform(image):
        return torch.zeros(3, 8, 8)

    loader = build_clip_dataloader(str(shards / "eval-*.tar"), dp_rank=0, dp_size=1, batch_size=40,
                                   tokenizer=tokenizer, image_transform=transform, context_length=24,
                                   shuffle_buffer=0, infinite=False)
    assert next(iter(loader))["images"].shape == (40, 3, 8, 8)


def test_workers_cover_all_samples(shards, tokenizer):
    spec = str(shards / "train-*.tar")
    loader = _loader(spec, tokenizer, batch_size=20, num_workers=2)
    assert _fingerprints(loader) == _fingerprints(_loader(spec, tokenizer, batch_size=20))
    assert loader.stats.samples_seen == NUM_TRAIN
