"""Sample indices from shard keys: img2dataset's numbers and the synthetic writer's keys."""
import tarfile

import pytest

from data.sample_index import sample_index_from_key
from data.synthetic import generate_shapes_dataset


def test_keys():
    assert sample_index_from_key("000010023") == 10023
    assert sample_index_from_key("train00000042") == 42
    assert sample_index_from_key("some/dir/eval00000007") == 7
    with pytest.raises(ValueError, match="'abc' does not end in a number"):
        sample_index_from_key("abc")


def test_synthetic_keys_index_the_rows(tmp_path):
    manifest = generate_shapes_dataset(str(tmp_path), num_train=30, num_eval=4, image_size=16, samples_per_shard=8)
    indices = []
    for shard in manifest["train"]:
        with tarfile.open(tmp_path / shard["path"]) as tar:
            keys = {m.name.rsplit(".", 1)[0] for m in tar.getmembers()}
        indices += [sample_index_from_key(k) for k in keys]
    assert sorted(indices) == list(range(30))  # dense rows: data_size = num_train
