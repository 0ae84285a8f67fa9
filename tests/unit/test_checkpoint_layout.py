"""Canonical names and boxes of the checkpoint format; exact resume of the data pipeline."""
import math
import pickle

import pytest
import torch

from engine.checkpoint.layout import clip_box, flat_range_boxes, local_to_global_name


@pytest.mark.parametrize("shape", [(), (7,), (4, 5), (3, 4, 5), (2, 1, 3, 4)])
def test_flat_range_boxes_cover_exactly_the_range(shape):
    numel = math.prod(shape)
    full = torch.arange(numel).view(shape) if shape else torch.tensor(0)
    for lo in range(numel):
        for hi in range(lo + 1, numel + 1):
            boxes = flat_range_boxes(shape, lo, hi)
            assert len(boxes) <= max(1, 2 * len(shape) - 1)
            got, expect_start = [], 0
            for off, size, start in boxes:
                assert start == expect_start  # boxes are consecutive pieces of the range
                view = full
                for d, (o, s) in enumerate(zip(off, size)):
                    view = view.narrow(d, o, s)
                got.append(view.reshape(-1))
                expect_start += math.prod(size)
            assert torch.equal(torch.cat(got), torch.arange(lo, hi)), (shape, lo, hi, boxes)


def test_local_to_global_layer_names():
    layers = {"visual": 12, "text": 8}
    assert local_to_global_name("visual.transformer.layers.1.mlp.linear_fc1.weight", 2, 4, layers) == \
        "visual.transformer.layers.7.mlp.linear_fc1.weight"
    assert local_to_global_name("text.transformer.layers.0.x", 3, 4, layers) == "text.transformer.layers.6.x"
    assert local_to_global_name("visual.conv1.weight", 1, 4, layers) == "visual.conv1.weight"
    assert local_to_global_name("text.transformer.final_layernorm.weight", 3, 4, layers) == \
        "text.transformer.final_layernorm.weight"
    with pytest.raises(ValueError, match="evenly"):
        local_to_global_name("text.transformer.layers.0.x", 1, 3, layers)


def test_clip_box_to_a_smaller_saved_tensor():
    t = torch.zeros(4, 3)
    assert clip_box((6, 0), t, (8, 3))[1].shape == (2, 3)
    assert clip_box((8, 0), t, (8, 3)) is None
    assert clip_box((0, 0), t, (8, 3))[1] is t


# -- data pipeline position ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data.synthetic import generate_shapes_dataset

    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(str(out), num_train=120, num_eval=8, image_size=32, samples_per_shard=20)
    return str(out)


@pytest.fixture(scope="module")
def tokenizer(shards, tmp_path_factory):
    from data.synthetic import read_captions
    from data.tokenizers import build_tokenizer

    return build_tokenizer("sentencepiece", None, read_captions(shards), 200, str(tmp_path_factory.mktemp("tok")))


def _train_loader(shards, tokenizer, num_workers=0, dp_rank=0, dp_size=2):
    from data.pipeline import build_clip_dataloader
    from data.transforms import build_image_transform

    return build_clip_dataloader(f"{shards}/train-*.tar", dp_rank=dp_rank, dp_size=dp_size, batch_size=7,
                                 tokenizer=tokenizer, image_transform=build_image_transform(32, train=True),
                                 context_length=16, shuffle_buffer=11, seed=5, infinite=True,
                                 num_workers=num_workers)


@pytest.mark.parametrize("stop", [0, 3, 8])  # before the first batch, mid-epoch, across an epoch (60 samples/rank)
def test_data_position_resumes_exactly(shards, tokenizer, stop):
    straight = iter(_train_loader(shards, tokenizer, dp_rank=1))
    want = [next(straight) for _ in range(14)]
    first_loader = _train_loader(shards, tokenizer, dp_rank=1)
    first = iter(first_loader)
    got = [next(first) for _ in range(stop)]
    state = pickle.loads(pickle.dumps(first_loader.state_dict()))  # as it goes through a checkpoint
    assert state["exact"]
    resumed_loader = _train_loader(shards, tokenizer, dp_rank=1)
    resumed = iter(resumed_loader)
    assert resumed_loader.load_state_dict(state) is True
    got += [next(resumed) for _ in range(14 - stop)]
    for a, b in zip(got, want):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])
    assert resumed_loader.stats.samples_seen == 14 * 7


def test_data_position_with_another_split_or_workers_is_a_fresh_stream(shards, tokenizer):
    loader = _train_loader(shards, tokenizer, dp_rank=0)
    it = iter(loader)
    seen = [next(it) for _ in range(4)]
    state = loader.state_dict()
    other = _train_loader(shards, tokenizer, dp_rank=0, dp_size=3)  # another DP size: other shards
    assert other.load_state_dict(state) is False
    batch = next(iter(other))
    assert not any(torch.equal(batch["images"], s["images"]) for s in seen)
    with_workers = _train_loader(shards, tokenizer, dp_rank=0, num_workers=1)
    assert with_workers.state_dict()["exact"] is False
