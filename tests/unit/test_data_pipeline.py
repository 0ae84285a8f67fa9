import logging

import pytest
import torch

from data.pipeline import build_clip_dataloader, expand_shards, split_shards_for_dp
from data.synthetic import generate_shapes_dataset
from data.tokenizers import build_tokenizer, eot_positions
from data.transforms import build_image_transform


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(str(out), num_train=240, num_eval=40, image_size=32, samples_per_shard=40)
    return out


@pytest.fixture(scope="module")
def tokenizer(shards, tmp_path_factory):
    from data.synthetic import read_captions

    return build_tokenizer("sentencepiece", None, read_captions(str(shards)), 200,
                           str(tmp_path_factory.mktemp("tok")))


def _loader(spec, tokenizer, dp_rank=0, dp_size=1, infinite=False, batch_size=16, seed=0, shuffle=0):
    return build_clip_dataloader(spec, dp_rank=dp_rank, dp_size=dp_size, batch_size=batch_size,
                                 tokenizer=tokenizer, image_transform=build_image_transform(32, train=True),
                                 context_length=24, shuffle_buffer=shuffle, seed=seed, infinite=infinite)


def _all_tokens(loader):
    return [row for batch in loader for row in batch["tokens"]]


def test_expand_shards_forms(shards):
    brace = expand_shards(str(shards / "train-{000000..000005}.tar"))
    assert brace == expand_shards(str(shards / "train-*.tar")) and len(brace) == 6
    assert len(expand_shards(str(shards))) == 7  # directory: train + eval shards


@pytest.mark.parametrize("dp_size", [2, 3])
def test_dp_ranks_get_disjoint_shards_covering_all(shards, tokenizer, dp_size):
    spec = str(shards / "train-*.tar")
    per_rank = [split_shards_for_dp(expand_shards(spec), r, dp_size) for r in range(dp_size)]
    flat = [s for shards_ in per_rank for s in shards_]
    assert sorted(flat) == sorted(expand_shards(spec)) and len(set(flat)) == len(flat)
    counts = []
    for rank in range(dp_size):
        loader = _loader(spec, tokenizer, rank, dp_size)
        counts.append(sum(b["images"].shape[0] for b in loader))
        assert loader.stats.samples_seen == counts[-1]
    assert sum(counts) == 240


def test_too_few_shards_for_dp(shards):
    with pytest.raises(ValueError, match="1 shards cannot be split over 2"):
        split_shards_for_dp([str(shards / "eval-000000.tar")], 0, 2)


def test_corrupt_and_missing_shards_are_skipped_and_counted(shards, tokenizer, tmp_path, caplog):
    good = shards / "train-000000.tar"
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[:5000])
    missing = tmp_path / "missing.tar"
    with caplog.at_level(logging.WARNING):
        loader = _loader([str(truncated), str(missing), str(shards / "train-000001.tar")], tokenizer, batch_size=8)
        n = sum(b["images"].shape[0] for b in loader)
    assert loader.stats.shards_skipped == 2
    assert n >= 40  # the good shard's samples all come through
    assert "truncated.tar" in caplog.text and "missing.tar" in caplog.text


def test_all_shards_bad_raises(tokenizer, tmp_path):
    with pytest.raises(RuntimeError, match="no readable sample"):
        list(_loader([str(tmp_path / "gone-a.tar"), str(tmp_path / "gone-b.tar")], tokenizer, infinite=True))


def test_corrupt_image_sample_is_skipped(shards, tokenizer, tmp_path, caplog):
    import tarfile, io  # noqa: E401

    path = tmp_path / "badimg.tar"
    with tarfile.open(path, "w") as tar:
        for key, payload in (("x.jpg", b"not a jpeg"), ("x.txt", b"a red circle")):
            info = tarfile.TarInfo(key)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with caplog.at_level(logging.WARNING):
        loader = _loader([str(path), str(shards / "train-000002.tar")], tokenizer, batch_size=8)
        n = sum(b["images"].shape[0] for b in loader)
    assert n == 40 and loader.stats.samples_skipped == 1 and "badimg.tar:x" in caplog.text


def test_batches_shapes_and_determinism(shards, tokenizer):
    spec = str(shards / "train-*.tar")
    a = _loader(spec, tokenizer, infinite=True, seed=3, shuffle=50)
    b = _loader(spec, tokenizer, infinite=True, seed=3, shuffle=50)
    batch_a, batch_b = next(iter(a)), next(iter(b))
    assert batch_a["images"].shape == (16, 3, 32, 32) and batch_a["images"].dtype == torch.float32
    assert batch_a["tokens"].shape == (16, 24) and batch_a["tokens"].dtype == torch.long
    assert (eot_positions(batch_a["tokens"], tokenizer.eot_id) > 0).all()
    assert torch.equal(batch_a["images"], batch_b["images"]) and torch.equal(batch_a["tokens"], batch_b["tokens"])
    other = next(iter(_loader(spec, tokenizer, infinite=True, seed=4, shuffle=50)))
    assert not torch.equal(other["tokens"], batch_a["tokens"])


def test_infinite_loader_crosses_epochs(shards, tokenizer):
    loader = _loader(str(shards / "train-00000[01].tar"), tokenizer, infinite=True, batch_size=16)
    it = iter(loader)
    batches = [next(it) for _ in range(8)]  # 128 samples from 80: at least one epoch boundary
    assert all(b["images"].shape[0] == 16 for b in batches)
    assert loader.stats.samples_seen == 128


def test_eval_keeps_last_partial_batch_and_labels(shards, tokenizer):
    loader = build_clip_dataloader(str(shards / "eval-*.tar"), dp_rank=0, dp_size=1, batch_size=16,
                                   tokenizer=tokenizer, image_transform=build_image_transform(32, train=False),
                                   context_length=24, shuffle_buffer=0, infinite=False)
    sizes = [b["images"].shape[0] for b in loader]
    assert sizes == [16, 16, 8]
    assert "class_index" in next(iter(loader))
