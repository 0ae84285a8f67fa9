"""examples/convert_checkpoint.py through the real engine checkpoint format (`engine.checkpoint.tools`):
open_clip / HF weights -> engine checkpoint (TP=1 and TP=2) -> reshard -> back, outputs within 1e-5.

Uses `write_model_checkpoint`, `read_model_checkpoint`, `inspect_checkpoint` and `reshard_checkpoint`
from engine/checkpoint/tools.py; tests/unit/test_convert_cli.py covers the CLI logic on its own.
"""
from __future__ import annotations

import os

import pytest
import torch

from conversion.files import save_tensor_file
from conversion.hf_clip_format import clip_config_from_hf, hf_to_clip_state_dict
from conversion.openclip_format import import_openclip
from tests.unit.test_convert_cli import load_cli
from tests.unit.test_convert_hf_clip import TINY_TEXT, TINY_VISION, build_hf, hf_embeddings, hf_inputs
from tests.unit.test_convert_open_clip import TINY, build_openclip, openclip_embeddings, require_open_clip, tiny_inputs

TOL = 1e-5


def _same_weights(got: dict, want: dict) -> None:
    """Tensor entries equal; the token embedding may carry a different amount of vocab padding."""
    want = {k: v for k, v in want.items() if isinstance(v, torch.Tensor)}
    assert {k for k, v in got.items() if isinstance(v, torch.Tensor)} == want.keys()
    for name, tensor in want.items():
        value = got[name]
        if name == "text.token_embedding.weight":
            rows = min(value.shape[0], tensor.shape[0], TINY_TEXT["vocab_size"])
            value, tensor = value[:rows], tensor[:rows]
        torch.testing.assert_close(value, tensor, atol=0, rtol=0, msg=name)


def test_open_clip_through_engine_checkpoint(single_rank, tmp_path):
    open_clip = require_open_clip()
    from engine.checkpoint.tools import read_model_checkpoint

    cli = load_cli()
    reference = build_openclip(TINY, tmp_path)
    images, tokens = tiny_inputs(TINY)
    ref = openclip_embeddings(reference, images, tokens)
    save_tensor_file(reference.state_dict(), str(tmp_path / "oc.safetensors"))
    ckpt = str(tmp_path / "ckpt")
    assert cli.main(["import-open-clip", str(tmp_path / "oc.safetensors"), "--vision-head-width", "16",
                     "--text-heads", "4", "--out", ckpt]) == 0
    cfg, full = import_openclip(reference.state_dict(), TINY)
    exp, state = read_model_checkpoint(ckpt)
    assert exp.model == cfg
    _same_weights(state, full)
    assert cli.main(["export-open-clip", ckpt, "--out", str(tmp_path / "local")]) == 0
    loaded = open_clip.create_model(f"local-dir:{tmp_path / 'local'}").eval()
    for a, b in zip(openclip_embeddings(loaded, images, tokens), ref):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_hf_through_engine_checkpoint_at_tp2_and_reshard(single_rank, tmp_path, capsys):
    import transformers
    from engine.checkpoint.tools import read_model_checkpoint

    cli = load_cli()
    reference = build_hf(TINY_TEXT, TINY_VISION, 32)
    reference.save_pretrained(tmp_path / "hf")
    images, ids = hf_inputs(TINY_TEXT, TINY_VISION)
    ref = hf_embeddings(reference, images, ids)
    cfg = clip_config_from_hf(reference.config.to_dict())
    full = hf_to_clip_state_dict(reference.state_dict(), cfg)

    tp2 = str(tmp_path / "ckpt_tp2")
    assert cli.main(["import-hf-clip", str(tmp_path / "hf"), "--out", tp2, "--tensor-model-parallel-size", "2"]) == 0
    exp, state = read_model_checkpoint(tp2)
    assert exp.model == cfg
    _same_weights(state, full)
    tp1 = str(tmp_path / "ckpt_tp1")
    assert cli.main(["reshard", tp2, tp1, "--tensor-model-parallel-size", "1"]) == 0
    _same_weights(read_model_checkpoint(tp1)[1], full)
    for source in (tp2, tp1):
        out = str(tmp_path / f"hf_from_{os.path.basename(source)}")
        assert cli.main(["export-hf-clip", source, "--out", out]) == 0
        loaded = transformers.CLIPModel.from_pretrained(out).eval()
        for a, b in zip(hf_embeddings(loaded, images, ids), ref):
            torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    capsys.readouterr()
    assert cli.main(["inspect", tp2]) == 0
    assert capsys.readouterr().out.strip()


def test_missing_engine_checkpoint_is_an_error(tmp_path, capsys):
    cli = load_cli()
    assert cli.main(["export-hf-clip", str(tmp_path / "absent"), "--out", str(tmp_path / "out")]) == 2
    assert "absent" in capsys.readouterr().err


def _engine_checkpoint(tmp_path, model_cfg=None, name="ckpt"):
    """An engine checkpoint imported through the CLI from an open_clip state dict of zeros."""
    from tests.unit.test_convert_cli import _zeros_open_clip

    out = str(tmp_path / name)
    args = _zeros_open_clip(tmp_path, model_cfg or TINY, f"src_{name}")
    assert load_cli().main(args + ["--out", out]) == 0
    return out


def test_reshard_layout_errors_are_usage_errors(single_rank, tmp_path, capsys):
    from tests.unit.test_convert_cli import HEADS6_ODD_FFN

    ckpt = _engine_checkpoint(tmp_path, HEADS6_ODD_FFN)
    capsys.readouterr()
    assert load_cli().main(["reshard", ckpt, str(tmp_path / "tp4"), "--tensor-model-parallel-size", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert_checkpoint.py reshard: error: ") and "Traceback" not in err
    for problem in ("model.vision.num_attention_heads=6", "model.text.num_attention_heads=6",
                    "model.vision.ffn_hidden_size=194", "model.text.ffn_hidden_size=242"):  # every one at once
        assert f"{problem} is not divisible by tensor_model_parallel_size=4" in err, err
    assert not os.path.exists(tmp_path / "tp4")


def test_exports_refuse_existing_targets_unless_overwrite(single_rank, tmp_path, capsys):
    ckpt = _engine_checkpoint(tmp_path)
    cli = load_cli()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert cli.main(["export-hf-clip", ckpt, "--out", str(hf)]) == 2
    assert "config.json exists; add --overwrite" in capsys.readouterr().err
    assert (hf / "config.json").read_text() == "{}" and sorted(os.listdir(hf)) == ["config.json"]
    assert cli.main(["export-hf-clip", ckpt, "--out", str(hf), "--overwrite"]) == 0
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors", "preprocessor_config.json"]

    weights = tmp_path / "oc.safetensors"
    weights.write_bytes(b"not mine to replace")
    assert cli.main(["export-open-clip", ckpt, "--out", str(weights)]) == 2
    assert "oc.safetensors exists; add --overwrite" in capsys.readouterr().err
    assert weights.read_bytes() == b"not mine to replace" and not os.path.exists(str(weights) + ".json")
    assert cli.main(["export-open-clip", ckpt, "--out", str(weights), "--overwrite"]) == 0
    assert weights.stat().st_size > 1000 and os.path.exists(str(weights) + ".json")
    local = tmp_path / "local"
    local.mkdir()
    (local / "notes.txt").write_text("x")
    assert cli.main(["export-open-clip", ckpt, "--out", str(local)]) == 2
    assert f"{local} exists; add --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["export-hf-clip", "export-open-clip"])
def test_exports_never_write_into_an_engine_checkpoint(single_rank, tmp_path, capsys, command):
    ckpt = _engine_checkpoint(tmp_path)
    cli = load_cli()
    before = sorted(os.listdir(ckpt))
    for out in (ckpt, os.path.join(ckpt, "hf")):
        assert cli.main([command, ckpt, "--out", out, "--overwrite"]) == 2
        assert "engine checkpoint directory; exports are never written into one" in capsys.readouterr().err
    assert sorted(os.listdir(ckpt)) == before
    assert cli.main(["inspect", ckpt]) == 0
    assert capsys.readouterr().out.startswith(f"checkpoint {ckpt}")  # still an engine checkpoint
    # a checkpoint root (step_* directories, `latest`) counts as well
    root = tmp_path / "run" / "checkpoints"
    os.makedirs(root)
    os.rename(ckpt, root / "step_000000010")
    (root / "latest").write_text("step_000000010\n")
    assert cli.main([command, str(root / "step_000000010"), "--out", str(root / "export"), "--overwrite"]) == 2
    assert f"lies inside {root}" in capsys.readouterr().err
    assert sorted(os.listdir(root)) == ["latest", "step_000000010"]
