"""`python -m data.image_folder`: an ImageFolder tree (one sub-folder per class) becomes train/eval
shards and classes.json that the project's own CLIP loader reads back with the right class index
and caption for every image; a run on user shards without a tokenizer is refused at the entry point."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from data.image_folder import main, write_image_folder_shards
from data.pipeline import build_clip_dataloader
from data.tokenizers import build_tokenizer
from data.transforms import CLIP_MEAN, CLIP_STD, build_image_transform

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# folder -> (fill colour, file format); one colour per class so an image shows which class it is
CLASSES = {"blue_circle": ((20, 40, 230), "JPEG"), "green_cross": ((30, 200, 40), "PNG"),
           "red_square": ((230, 20, 20), "PNG")}
PER_CLASS = 6


def make_image_folder(root, per_class: int = PER_CLASS, size=(40, 30)):
    """ROOT/<class>/<n>.<jpg|png> images of one colour per class, an RGBA png, a nested folder, a
    file that is not an image and one that claims to be a jpg but is not."""
    for folder, (colour, fmt) in CLASSES.items():
        for i in range(per_class):
            sub = root / folder / ("nested" if i == per_class - 1 else "")
            sub.mkdir(parents=True, exist_ok=True)
            mode = "RGBA" if (fmt == "PNG" and i == 0) else "RGB"
            image = Image.new(mode, size, colour + ((255,) if mode == "RGBA" else ()))
            image.save(sub / f"{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}", format=fmt)
    (root / "blue_circle" / "notes.txt").write_text("not an image, not picked up")
    (root / "green_cross" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("folder"))
    out = tmp_path_factory.mktemp("out") / "shards"
    manifest = write_image_folder_shards(str(root), str(out), eval_fraction=0.34, samples_per_shard=4,
                                         caption_templates=["a photo of a {}."], image_size=24, seed=0)
    return root, out, manifest


def _tokenizer(tmp_path, captions):
    return build_tokenizer("sentencepiece", None, captions, 100, str(tmp_path))


def _read_back(spec, tokenizer):
    loader = build_clip_dataloader(spec, dp_rank=0, dp_size=1, batch_size=5, tokenizer=tokenizer,
                                   image_transform=build_image_transform(24, train=False), context_length=16,
                                   shuffle_buffer=0, infinite=False)
    samples = [(img, tok, int(idx)) for batch in loader
               for img, tok, idx in zip(batch["images"], batch["tokens"], batch["class_index"])]
    return samples, loader.stats


def _mean_rgb(image: torch.Tensor):
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((image * std + mean) * 255).mean(dim=(1, 2)).tolist()


def test_files_counts_and_classes(written):
    _root, out, manifest = written
    names = sorted(os.listdir(out))
    assert names == ["classes.json"] + [s["path"] for s in manifest["eval"]] + ["manifest.json"] + \
        [s["path"] for s in manifest["train"]]
    assert manifest["train"][0]["path"] == "train-000000.tar" and manifest["eval"][0]["path"] == "eval-000000.tar"
    classes = json.loads((out / "classes.json").read_text())
    # sorted folder names, as ImageFolder's class_to_idx; underscores read as spaces
    assert classes == {"classnames": ["blue circle", "green cross", "red square"], "templates": ["a photo of a {}."],
                       "folders": ["blue_circle", "green_cross", "red_square"]}
    # The split is by file: round(6 x 0.34) = 2 of 6 to eval (blue, red), round(7 x 0.34) = 2 of 7 for
    # green, whose broken.jpg is then named and skipped from the split it fell in.
    (skipped,) = manifest["skipped"]
    assert skipped["file"] == "green_cross/broken.jpg" and "UnidentifiedImageError" in skipped["error"]
    expected = {"train": 4 + 5 + 4, "eval": 2 + 2 + 2}
    expected[skipped["split"]] -= 1
    assert manifest["num_samples"] == expected and sum(expected.values()) == 18
    for split in ("train", "eval"):
        sizes = [s["samples"] for s in manifest[split]]
        assert sum(sizes) == expected[split] and all(n == 4 for n in sizes[:-1]) and 0 < sizes[-1] <= 4


def test_loader_reads_back_class_index_caption_and_image(written, tmp_path):
    _root, out, manifest = written
    classes = json.loads((out / "classes.json").read_text())
    tokenizer = _tokenizer(tmp_path, [f"a photo of a {c}." for c in classes["classnames"]])
    sources = set()
    for split in ("train", "eval"):
        samples, stats = _read_back(str(out / f"{split}-*.tar"), tokenizer)
        per_class = {"train": [4, 5, 4], "eval": [2, 2, 2]}[split]
        per_class[1] -= manifest["skipped"][0]["split"] == split  # green_cross/broken.jpg
        assert stats.samples_seen == len(samples) == sum(per_class) and stats.samples_skipped == 0
        assert [sum(idx == c for *_, idx in samples) for c in range(3)] == per_class
        for image, tokens, idx in samples:
            name = classes["classnames"][idx]
            assert tokenizer.decode(tokens) == f"a photo of a {name}."
            colour = CLASSES[classes["folders"][idx]][0]
            # the image is the one of that class (JPEG keeps a flat colour within a few levels)
            assert all(abs(m - c) < 12 for m, c in zip(_mean_rgb(image), colour)), (name, _mean_rgb(image))
            assert tuple(image.shape) == (3, 24, 24)
    # every json names its key and its source file, and each source appears once over both splits
    import tarfile

    for shard in manifest["train"] + manifest["eval"]:
        with tarfile.open(out / shard["path"]) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    assert meta["key"] == member.name[: -len(".json")]
                    assert meta["source"].split("/")[0] == classes["folders"][meta["class_index"]]
                    sources.add(meta["source"])
    assert len(sources) == 18 and "blue_circle/nested/005.jpg" in sources


def test_images_resized_to_the_short_side_and_jpegs_kept(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (80, 40), (10, 20, 30)).save(root / "a" / "wide.png")
    Image.new("RGB", (30, 20), (10, 20, 30)).save(root / "a" / "small.jpg", format="JPEG")
    original = (root / "a" / "small.jpg").read_bytes()
    write_image_folder_shards(str(root), str(tmp_path / "out"), eval_fraction=0.0, image_size=32)
    import tarfile

    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    sizes = {}
    for name, payload in members.items():
        if name.endswith(".json"):
            sizes[json.loads(payload)["source"]] = members[name.replace(".json", ".jpg")]
    import io

    assert Image.open(io.BytesIO(sizes["a/wide.png"])).size == (64, 32)
    assert sizes["a/small.jpg"] == original  # never enlarged, a JPEG kept byte for byte
    assert not (tmp_path / "out" / "eval-000000.tar").exists()  # --eval-fraction 0: no eval shards


def test_deterministic(tmp_path):
    root = make_image_folder(tmp_path / "root")
    for name in ("a", "b"):
        write_image_folder_shards(str(root), str(tmp_path / name), eval_fraction=0.2, samples_per_shard=5,
                                  caption_templates=["a photo of a {}.", "a {} in a photo."], seed=3)
    for shard in sorted(os.listdir(tmp_path / "a")):
        if shard.endswith(".tar"):
            assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes(), shard
    write_image_folder_shards(str(root), str(tmp_path / "c"), eval_fraction=0.2, samples_per_shard=5, seed=4)
    assert (tmp_path / "a" / "eval-000000.tar").read_bytes() != (tmp_path / "c" / "eval-000000.tar").read_bytes()


def test_cli_refuses_a_non_empty_output_and_bad_input(tmp_path, capsys):
    root = make_image_folder(tmp_path / "root", per_class=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for argv, message in (
        ([str(root), "--out", str(out)], "exists and is not empty"),
        ([str(tmp_path / "nothing"), "--out", str(tmp_path / "o2")], "no such directory"),
        ([str(root / "blue_circle" / "nested"), "--out", str(tmp_path / "o3")], "no class sub-folders"),
        ([str(root), "--out", str(tmp_path / "o4"), "--caption-template", "a photo"], "needs exactly one '{}'"),
        ([str(root), "--out", str(tmp_path / "o5"), "--eval-fraction", "1"], "must be in [0, 1)"),
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directory left behind
    # an existing empty directory is used; the summary names the skipped file and the next commands
    (tmp_path / "empty").mkdir()
    main([str(root), "--out", str(tmp_path / "empty"), "--samples-per-shard", "2", "--eval-fraction", "0.5"])
    printed = capsys.readouterr().out
    assert "skipped green_cross/broken.jpg: UnidentifiedImageError" in printed
    assert f"python -m data.train_tokenizer '{tmp_path}/empty/train-{{000000..000001}}.tar'" in printed
    assert f"data.eval_shards='{tmp_path}/empty/eval-{{000000..000001}}.tar'" in printed


def test_entry_point_refuses_user_shards_without_a_tokenizer(written, tmp_path):
    _root, out, _manifest = written
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "examples/pretrain_clip.py", "--config", "configs/clip/tiny.yaml",
         f"data.train_shards={out}/train-{{000000..000002}}.tar", f"data.eval_shards={out}/eval-*.tar",
         f"data.classes_file={out}/classes.json", f"trainer.output_dir={run_dir}"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "error: data.tokenizer.path is required with user shards" in result.stderr
    assert "python -m data.train_tokenizer" in result.stderr  # says how to make one
    assert "Traceback" not in result.stderr and not run_dir.exists()
