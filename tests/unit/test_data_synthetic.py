import io
import json
import tarfile

from PIL import Image

from data.synthetic import COLORS, SHAPES, generate_shapes_dataset, held_out_pairs, load_classes, read_captions


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _samples(out_dir, split):
    manifest = json.load(open(out_dir / "manifest.json"))
    for shard in manifest[split]:
        members = _members(out_dir / shard["path"])
        for name in members:
            if name.endswith(".json"):
                key = name[:-5]
                yield key, members[key + ".jpg"], members[key + ".txt"].decode(), json.loads(members[name])


def test_deterministic_from_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        generate_shapes_dataset(str(out), num_train=60, num_eval=20, image_size=32, samples_per_shard=30, seed=seed)
    assert (a / "train-000001.tar").read_bytes() == (b / "train-000001.tar").read_bytes()
    assert (a / "train-000001.tar").read_bytes() != (c / "train-000001.tar").read_bytes()


def test_held_out_pairs_never_in_train_and_attributes_covered(tmp_path):
    generate_shapes_dataset(str(tmp_path), num_train=400, num_eval=60, image_size=32, samples_per_shard=100)
    held = set(held_out_pairs())
    assert len(held) == 12
    # every colour and every shape is held out twice and still has 4 training pairs
    assert all(sum(c == color for c, _ in held) == 2 for color in COLORS)
    assert all(sum(s == shape for _, s in held) == 2 for shape in SHAPES)
    train_colors, train_shapes = set(), set()
    for key, jpg, caption, meta in _samples(tmp_path, "train"):
        assert (meta["color"], meta["shape"]) not in held
        assert meta["color"] in caption and meta["shape"] in caption
        train_colors.add(meta["color"])
        train_shapes.add(meta["shape"])
        assert Image.open(io.BytesIO(jpg)).size == (32, 32)
    assert train_colors == set(COLORS) and train_shapes == set(SHAPES)
    classes = load_classes(str(tmp_path))
    for key, jpg, caption, meta in _samples(tmp_path, "eval"):
        assert (meta["color"], meta["shape"]) in held
        assert classes["classnames"][meta["class_index"]] == meta["class_name"]
    assert len(read_captions(str(tmp_path), "train")) == 400


def test_regeneration_is_skipped_when_manifest_matches(tmp_path):
    generate_shapes_dataset(str(tmp_path), num_train=30, num_eval=10, image_size=32, samples_per_shard=30)
    shard = tmp_path / "train-000000.tar"
    stamp = shard.stat().st_mtime_ns
    generate_shapes_dataset(str(tmp_path), num_train=30, num_eval=10, image_size=32, samples_per_shard=30)
    assert shard.stat().st_mtime_ns == stamp
