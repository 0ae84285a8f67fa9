import io
import json
import tarfile

from PIL import Image

from data.synthetic import (COLORS, POSITION_PHRASES, SHAPES, generate_shapes_dataset, held_out_pairs, load_classes,
                            main, read_captions)


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _samples(out_dir, split):
    manifest = json.loads((out_dir / "manifest.json").read_text())
    for shard in manifest[split]:
        members = _members(out_dir / shard["path"])
        keys = {name.rsplit(".", 1)[0] for name in members}
        assert len(keys) == shard["samples"]
        for key in sorted(keys):
            assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= set(members), key
            yield key, members[key + ".jpg"], members[key + ".txt"].decode(), json.loads(members[key + ".json"])


def _files(out_dir):
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


def test_deterministic_from_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        generate_shapes_dataset(str(out), num_train=60, num_eval=20, image_size=32, samples_per_shard=30, seed=seed)
    files_a, files_b, files_c = _files(a), _files(b), _files(c)
    assert set(files_a) == {"train-000000.tar", "train-000001.tar", "eval-000000.tar", "manifest.json",
                            "classes.json"}
    assert files_a == files_b  # byte-identical, tar headers included
    for name in ("train-000000.tar", "train-000001.tar", "eval-000000.tar"):
        assert files_a[name] != files_c[name]


def test_held_out_pairs_never_in_train_and_attributes_covered(tmp_path):
    manifest = generate_shapes_dataset(str(tmp_path), num_train=400, num_eval=60, image_size=32,
                                       samples_per_shard=100)
    assert manifest["num_samples"] == {"train": 400, "eval": 60} and manifest["image_size"] == 32
    assert [s["samples"] for s in manifest["train"]] == [100] * 4
    held = set(held_out_pairs())
    assert len(held) == 12
    # every colour and every shape is held out twice and still has 4 training pairs
    assert all(sum(c == color for c, _ in held) == 2 for color in COLORS)
    assert all(sum(s == shape for _, s in held) == 2 for shape in SHAPES)
    train_colors, train_shapes = set(), set()
    detailed = object_only = 0
    for _key, jpg, caption, meta in _samples(tmp_path, "train"):
        assert (meta["color"], meta["shape"]) not in held
        assert meta["class_index"] == -1 and meta["class_name"] == f"{meta['color']} {meta['shape']}"
        assert meta["color"] in caption and meta["shape"] in caption, caption
        # A caption names both size and position, or neither (the object-only ones, like the prompts).
        details = [word in caption for word in (meta["size"], POSITION_PHRASES[meta["position"]])]
        assert all(details) or not any(details), (meta, caption)
        detailed += all(details)
        object_only += not any(details)
        train_colors.add(meta["color"])
        train_shapes.add(meta["shape"])
        image = Image.open(io.BytesIO(jpg))
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
    assert train_colors == set(COLORS) and train_shapes == set(SHAPES)
    assert detailed > 100 and object_only > 100  # 6 of the 10 templates are detailed

    classes = load_classes(str(tmp_path))
    assert len(classes["classnames"]) == 12 and len(classes["train_classnames"]) == 24
    assert not set(classes["classnames"]) & set(classes["train_classnames"])
    assert all("{}" in t for t in classes["templates"])
    eval_classes = set()
    for _key, jpg, _caption, meta in _samples(tmp_path, "eval"):
        assert (meta["color"], meta["shape"]) in held
        assert classes["classnames"][meta["class_index"]] == meta["class_name"]
        Image.open(io.BytesIO(jpg)).load()
        eval_classes.add(meta["class_name"])
    assert len(eval_classes) > 6  # 60 draws over 12 classes
    captions = read_captions(str(tmp_path), "train")
    assert len(captions) == 400 and len(set(captions)) > 50


def test_regeneration_is_skipped_when_manifest_matches(tmp_path):
    generate_shapes_dataset(str(tmp_path), num_train=30, num_eval=10, image_size=32, samples_per_shard=30)
    shard = tmp_path / "train-000000.tar"
    stamp = shard.stat().st_mtime_ns
    generate_shapes_dataset(str(tmp_path), num_train=30, num_eval=10, image_size=32, samples_per_shard=30)
    assert shard.stat().st_mtime_ns == stamp


def test_changed_parameters_or_missing_shard_regenerate(tmp_path):
    generate_shapes_dataset(str(tmp_path), num_train=60, num_eval=10, image_size=32, samples_per_shard=20)
    assert (tmp_path / "train-000002.tar").exists()
    generate_shapes_dataset(str(tmp_path), num_train=40, num_eval=10, image_size=32, samples_per_shard=20)
    assert not (tmp_path / "train-000002.tar").exists()  # a stale shard would leak into 'train-*.tar'
    (tmp_path / "train-000001.tar").unlink()
    generate_shapes_dataset(str(tmp_path), num_train=40, num_eval=10, image_size=32, samples_per_shard=20)
    assert (tmp_path / "train-000001.tar").exists()


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path), "--num-train", "20", "--num-eval", "5", "--image-size", "24",
          "--samples-per-shard", "10", "--seed", "3"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "train": {"shards": 2, "samples": 20}, "eval": {"shards": 1, "samples": 5}}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["params"]["image_size"] == 24
