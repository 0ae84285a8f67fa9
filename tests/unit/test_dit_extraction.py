"""Embedding extraction: chunks + manifest round trip against the towers' own forward pass, a killed
extraction resumed without duplicates or gaps, corrupt and truncated chunks named, and settings
that changed between runs refused."""
import os

import pytest
import torch

from models.dit.embeddings import EmbeddingDataError, EmbeddingSet, verify_directory
from tests.distributed.dit_fixtures import condition_spec, read_captions, tiny_shapes, tiny_target_checkpoint


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_extraction")
    shards = tiny_shapes(str(root / "shapes"))
    checkpoint, tokenizer = tiny_target_checkpoint(str(root), read_captions(shards))
    return shards, checkpoint, tokenizer


def _extract(out, inputs, **kwargs):
    from engine.checkpoint.tools import single_process_parallel_state
    from models.dit.extraction import extract
    from models.dit.towers import TowerSpec

    shards, checkpoint, tokenizer = inputs
    with single_process_parallel_state():
        return extract(str(out), shards, condition_spec(kwargs.pop("layer", -1)),
                       TowerSpec(f"checkpoint:{checkpoint}", tokenizer=f"sentencepiece:{tokenizer}"),
                       device=torch.device("cpu"), samples_per_chunk=5, batch_size=4, **kwargs)


def _contents(directory):
    data = EmbeddingSet(str(directory))
    rows = data.read_all(["condition", "target_patches", "target_embedding", "text_embedding"])
    keys = [k for i in range(len(data.chunks)) for k in data.metadata(i)["keys"]]
    return [c.name for c in data.chunks], keys, rows, data.captions()


def test_round_trip_matches_the_towers(inputs, tmp_path):
    from data.transforms import build_image_transform
    from engine.checkpoint.tools import single_process_parallel_state
    from models.dit.extraction import _samples
    from models.dit.towers import TowerSpec, load_tower, text_embeddings, tower_features

    manifest = _extract(tmp_path / "emb", inputs, dtype="float32")
    shards, checkpoint, tokenizer = inputs
    assert manifest["num_samples"] == 36 and manifest["num_chunks"] == 9  # 3 shards x (5 + 5 + 2)
    assert manifest["tensors"]["condition"] == {"shape": [16, 32], "dtype": "float32"}
    assert manifest["tensors"]["target_patches"]["shape"] == [16, 48]
    assert manifest["tensors"]["text_embedding"]["shape"] == [16]
    assert manifest["source_shards"] == shards and manifest["towers"]["condition"]["source"].startswith("random:")
    assert all(len(c["sha256"]) == 64 for c in manifest["chunks"]) and verify_directory(str(tmp_path / "emb")) == []
    names, keys, rows, captions = _contents(tmp_path / "emb")
    samples = [s for shard in shards for s in _samples(shard)]
    assert keys == [k for k, _, _ in samples] and captions == [c for _, _, c in samples]
    # The stored features are the towers' own outputs on the same images.
    with single_process_parallel_state():
        cond = load_tower(condition_spec(), torch.device("cpu"))
        target = load_tower(TowerSpec(f"checkpoint:{checkpoint}", tokenizer=f"sentencepiece:{tokenizer}"),
                            torch.device("cpu"), with_text=True)
        images = [img for _, img, _ in samples[:6]]
        transform = build_image_transform(32, train=False)
        batch = torch.stack([transform(i) for i in images])
        want_cond, _ = tower_features(cond, batch)
        want_patches, want_own = tower_features(target, batch, want_embedding=True)
        want_text = text_embeddings(target, captions[:6], torch.device("cpu"))
    torch.testing.assert_close(rows["condition"][:6], want_cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows["target_patches"][:6], want_patches, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows["target_embedding"][:6], want_own, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows["text_embedding"][:6], want_text, atol=1e-5, rtol=1e-5)
    projection = EmbeddingSet(str(tmp_path / "emb")).projection()
    torch.testing.assert_close(projection, target.visual.proj.weight.detach())


def test_killed_extraction_resumes_without_duplicates_or_gaps(inputs, tmp_path):
    reference = _extract(tmp_path / "straight", inputs)
    written = []

    def crash_on_the_fourth(name):  # the chunk file is in place, its record is not: the worst moment
        written.append(name)
        if len(written) == 4:
            raise Crash(name)

    with pytest.raises(Crash):
        _extract(tmp_path / "killed", inputs, before_record=crash_on_the_fourth)
    assert not os.path.exists(tmp_path / "killed" / "manifest.json")
    with open(tmp_path / "killed" / "chunks" / "stale.safetensors.tmp123", "w") as fh:  # a write cut short
        fh.write("partial")
    resumed = []
    _extract(tmp_path / "killed", inputs, before_record=resumed.append)
    # Only the unrecorded chunk and the ones never reached were computed again.
    assert resumed[0] == written[-1] and len(resumed) == reference["num_chunks"] - 3
    assert not os.path.exists(tmp_path / "killed" / "chunks" / "stale.safetensors.tmp123")
    a, b = _contents(tmp_path / "straight"), _contents(tmp_path / "killed")
    assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3]  # chunk names, keys in order, captions
    assert len(set(b[1])) == len(b[1]) == 36
    for name, tensor in a[2].items():
        assert torch.equal(tensor, b[2][name]), name


def test_corrupt_and_truncated_chunks_are_named_and_extracted_again(inputs, tmp_path):
    out = tmp_path / "emb"
    manifest = _extract(out, inputs)
    bad, short = manifest["chunks"][2], manifest["chunks"][5]
    with open(out / bad["file"], "r+b") as fh:  # flip bytes inside the tensor data
        fh.seek(bad["bytes"] - 40)
        fh.write(b"\xff" * 8)
    with open(out / short["file"], "r+b") as fh:
        fh.truncate(short["bytes"] - 100)
    problems = verify_directory(str(out))
    assert len(problems) == 2 and bad["name"] in problems[0] and "sha256" in problems[0]
    assert short["name"] in problems[1] and "truncated" in problems[1]
    with pytest.raises(EmbeddingDataError, match=short["name"]):  # sizes are always checked
        EmbeddingSet(str(out))
    redone = []
    _extract(out, inputs, before_record=redone.append)
    assert sorted(redone) == sorted([bad["name"], short["name"]]) and verify_directory(str(out)) == []
    EmbeddingSet(str(out), verify_checksums=True)


def test_changed_settings_are_refused(inputs, tmp_path):
    _extract(tmp_path / "emb", inputs)
    with pytest.raises(EmbeddingDataError, match="samples_per_chunk") as info:
        from engine.checkpoint.tools import single_process_parallel_state
        from models.dit.extraction import extract
        from models.dit.towers import TowerSpec

        shards, checkpoint, tokenizer = inputs
        with single_process_parallel_state():
            extract(str(tmp_path / "emb"), shards, condition_spec(), TowerSpec(f"checkpoint:{checkpoint}"),
                    device=torch.device("cpu"), samples_per_chunk=7)
    assert "target_tower" in str(info.value)


def _cli():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "extract_embeddings.py")
    spec = importlib.util.spec_from_file_location("extract_embeddings_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_intermediate_layer_and_the_verify_command(inputs, tmp_path, capsys):
    from data.transforms import build_image_transform
    from engine.checkpoint.tools import single_process_parallel_state
    from models.dit.extraction import _samples
    from models.dit.towers import load_tower, tower_features

    manifest = _extract(tmp_path / "emb", inputs, layer=1, dtype="float32")
    assert manifest["towers"]["condition"]["layer"] == 1
    stored = EmbeddingSet(str(tmp_path / "emb")).read(0, 0, 2, ["condition"])["condition"]
    images = [img for _, img, _ in list(_samples(inputs[0][0]))[:2]]
    batch = torch.stack([build_image_transform(32, train=False)(i) for i in images])
    with single_process_parallel_state():
        after_first, _ = tower_features(load_tower(condition_spec(1), torch.device("cpu")), batch)
        output, _ = tower_features(load_tower(condition_spec(-1), torch.device("cpu")), batch)
    torch.testing.assert_close(stored, after_first, atol=1e-5, rtol=1e-5)
    assert (stored - output).abs().max() > 1e-2  # the hidden states after layer 1, not the output tokens
    cli = _cli()
    cli.main(["--verify", str(tmp_path / "emb")])
    assert "complete" in capsys.readouterr().out
    os.remove(tmp_path / "emb" / manifest["chunks"][0]["file"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--verify", str(tmp_path / "emb")])
    assert exit_info.value.code == 1 and manifest["chunks"][0]["name"] in capsys.readouterr().out


@pytest.mark.parametrize("layer", [-1, 1])
def test_hugging_face_tower_gives_transformers_own_features(tmp_path, layer):
    """hf:DIR towers go through conversion/: patch features of the output (after the final norm) or
    of layer k, and the image embedding, equal transformers' own forward pass (1e-5)."""
    from engine.checkpoint.tools import single_process_parallel_state
    from models.dit.towers import TowerSpec, load_tower, tower_features
    from tests.unit.test_convert_hf_clip import TINY_TEXT, TINY_VISION, build_hf

    hf = build_hf(TINY_TEXT, TINY_VISION, 32)
    hf.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hf.vision_model(pixel_values=images, output_hidden_states=True)
        want = hf.vision_model.post_layernorm(out.last_hidden_state) if layer == -1 else out.hidden_states[layer]
        embedding = hf.visual_projection(hf.vision_model.post_layernorm(out.last_hidden_state[:, 0]))
    with single_process_parallel_state():
        tower = load_tower(TowerSpec(f"hf:{tmp_path / 'hf'}", layer=layer), torch.device("cpu"))
        patches, own = tower_features(tower, images, want_embedding=True)
    torch.testing.assert_close(patches, want[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(own, embedding, atol=1e-5, rtol=1e-5)
