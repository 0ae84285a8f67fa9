"""examples/convert_checkpoint.py: --help, import/export wiring for open_clip and HF CLIP, errors, inspect
and reshard dispatch. The engine checkpoint functions (`engine.checkpoint.tools`) are replaced by an
in-memory stand-in here so the CLI is tested on its own; tests/unit/test_convert_cli_engine.py runs
the same flows through the real engine checkpoint format.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from tests.unit.test_convert_hf_clip import TINY_TEXT, TINY_VISION, build_hf, hf_embeddings, hf_inputs
from tests.unit.test_convert_open_clip import (
    TINY, TINY_ODD_FFN, build_openclip, openclip_embeddings, require_open_clip, tiny_inputs,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "convert_checkpoint.py")
TOL = 1e-5
SUBCOMMANDS = ["import-open-clip", "export-open-clip", "import-hf-clip", "export-hf-clip", "inspect", "reshard"]


def load_cli():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cli():
    return load_cli()


@pytest.fixture
def store(monkeypatch):
    """An in-memory `engine.checkpoint.tools` with the agreed signatures; returns its records."""
    records = {"checkpoints": {}, "reshard": [], "inspect": []}

    def write_model_checkpoint(out_dir, cfg, full_state_dict):
        os.makedirs(out_dir, exist_ok=True)
        records["checkpoints"][os.path.abspath(out_dir)] = (copy.deepcopy(cfg), dict(full_state_dict))

    def read_model_checkpoint(path):
        cfg, state = records["checkpoints"][os.path.abspath(path)]
        return copy.deepcopy(cfg), dict(state)

    def inspect_checkpoint(path):
        records["inspect"].append(path)
        return f"engine checkpoint {path}"

    def reshard_checkpoint(src, dst, tensor_model_parallel_size, pipeline_model_parallel_size, dtype):
        records["reshard"].append((src, dst, tensor_model_parallel_size, pipeline_model_parallel_size, dtype))
        records["checkpoints"][os.path.abspath(dst)] = records["checkpoints"][os.path.abspath(src)]

    fake = types.ModuleType("engine.checkpoint.tools")
    for fn in (write_model_checkpoint, read_model_checkpoint, inspect_checkpoint, reshard_checkpoint):
        setattr(fake, fn.__name__, fn)
    monkeypatch.setitem(sys.modules, "engine.checkpoint.tools", fake)
    return records


def test_help_explains_every_subcommand():
    out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in SUBCOMMANDS:
        assert f"  {command} " in out.stdout, command
    assert "missing, unexpected and mis-shaped" in out.stdout
    sub = subprocess.run([sys.executable, SCRIPT, "import-open-clip", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert sub.returncode == 0 and "--model-name" in sub.stdout and "--tensor-model-parallel-size" in sub.stdout


def test_import_export_open_clip(single_rank, tmp_path, cli, store):
    open_clip = require_open_clip()
    reference = build_openclip(TINY, tmp_path)
    images, tokens = tiny_inputs(TINY)
    ref = openclip_embeddings(reference, images, tokens)
    weights = tmp_path / "oc.safetensors"
    from conversion.files import save_tensor_file

    save_tensor_file(reference.state_dict(), str(weights))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    ckpt = str(tmp_path / "ckpt")
    assert cli.main(["import-open-clip", str(weights), "--model-config", str(config), "--out", ckpt,
                     "trainer.max_steps=7", "model.text.activations_checkpoint_granularity=selective"]) == 0
    exp, state = store["checkpoints"][os.path.abspath(ckpt)]
    assert exp.trainer.max_steps == 7 and exp.model.text.activations_checkpoint_granularity == "selective"
    assert exp.model.vision.hidden_size == 64 and exp.model.text.vocab_size == 300
    from models.clip.model import CLIPModel

    ours = CLIPModel(exp.model).eval()
    ours.load_state_dict(state, strict=True)
    with torch.no_grad():
        for a, b in zip((ours.encode_image(images), ours.encode_text(tokens)), ref):
            torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)

    # Shapes inferred from the weights give the same model section.
    assert cli.main(["import-open-clip", str(weights), "--vision-head-width", "16", "--text-heads", "4",
                     "--out", str(tmp_path / "ckpt2")]) == 0
    plain = copy.deepcopy(exp.model)
    plain.text.activations_checkpoint_granularity = None  # the override above, not part of the weights
    assert store["checkpoints"][os.path.abspath(tmp_path / "ckpt2")][0].model == plain

    # Export as an open_clip local-dir (open_clip's own factory loads it) and as a single file.
    assert cli.main(["export-open-clip", ckpt, "--out", str(tmp_path / "local")]) == 0
    loaded = open_clip.create_model(f"local-dir:{tmp_path / 'local'}").eval()
    for a, b in zip(openclip_embeddings(loaded, images, tokens), ref):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    assert cli.main(["export-open-clip", ckpt, "--out", str(tmp_path / "back.pt"), "--dtype", "bf16"]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back.keys() == reference.state_dict().keys() and back["visual.proj"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "back.pt.json").read_text())["embed_dim"] == 32
    # The exported directory imports again without naming the model.
    assert cli.main(["import-open-clip", str(tmp_path / "local"), "--out", str(tmp_path / "ckpt3")]) == 0
    assert store["checkpoints"][os.path.abspath(tmp_path / "ckpt3")][0].model == plain


def test_import_export_hf_clip(single_rank, tmp_path, cli, store):
    reference = build_hf(TINY_TEXT, TINY_VISION, 32)
    reference.save_pretrained(tmp_path / "hf")
    images, ids = hf_inputs(TINY_TEXT, TINY_VISION)
    ref = hf_embeddings(reference, images, ids)
    ckpt = str(tmp_path / "ckpt")
    assert cli.main(["import-hf-clip", str(tmp_path / "hf"), "--out", ckpt, "--dtype", "fp32"]) == 0
    exp, state = store["checkpoints"][os.path.abspath(ckpt)]
    assert exp.model.text.eot_token_id == -1 and exp.model.vision.activation == "quick_gelu"
    assert cli.main(["export-hf-clip", ckpt, "--out", str(tmp_path / "out")]) == 0
    import transformers

    loaded = transformers.CLIPModel.from_pretrained(str(tmp_path / "out")).eval()
    for a, b in zip(hf_embeddings(loaded, images, ids), ref):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_import_at_tp2_writes_then_reshards(tmp_path, cli, store):
    reference = build_hf(TINY_TEXT, TINY_VISION, 32)
    reference.save_pretrained(tmp_path / "hf")
    out = str(tmp_path / "ckpt_tp2")
    assert cli.main(["import-hf-clip", str(tmp_path / "hf"), "--out", out, "--tensor-model-parallel-size", "2"]) == 0
    (src, dst, tp, pp, dtype), = store["reshard"]
    assert (dst, tp, pp, dtype) == (out, 2, 1, None)
    assert not os.path.exists(src)  # the TP=1 staging copy is removed
    assert cli.main(["reshard", out, str(tmp_path / "r"), "--tensor-model-parallel-size", "4",
                     "--pipeline-model-parallel-size", "2", "--dtype", "bf16"]) == 0
    assert store["reshard"][-1] == (out, str(tmp_path / "r"), 4, 2, torch.bfloat16)


def test_errors_exit_2_and_name_the_problem(tmp_path, cli, store, capsys):
    reference = build_hf(TINY_TEXT, TINY_VISION, 32)
    reference.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    assert cli.main(["import-hf-clip", str(tmp_path / "hf"), "--out", str(tmp_path / "x")]) == 2
    assert str(weights) in capsys.readouterr().err

    from conversion.files import save_tensor_file
    from conversion.openclip_format import clip_config_from_openclip, expected_openclip_shapes

    shapes = expected_openclip_shapes(clip_config_from_openclip(TINY))
    save_tensor_file({k: torch.zeros(s) for k, s in shapes.items()}, str(tmp_path / "oc.safetensors"))
    assert cli.main(["import-open-clip", str(tmp_path / "oc.safetensors"), "--model-name", "ViT-B-32",
                     "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "missing keys" in err and "visual.transformer.resblocks.{2-11}.ln_1.weight" in err
    assert "visual.conv1.weight: found (64, 3, 8, 8), expected (768, 3, 32, 32)" in err
    assert cli.main(["import-open-clip", str(tmp_path / "oc.safetensors"), "--model-name", "ViT-Q-99",
                     "--out", str(tmp_path / "z")]) == 2
    assert "unknown open_clip model 'ViT-Q-99'" in capsys.readouterr().err
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    assert cli.main(["import-open-clip", str(tmp_path / "oc.safetensors"), "--model-config",
                     str(tmp_path / "tiny.json"), "--out", str(tmp_path / "w"), "model.text.num_layers=3"]) == 2
    assert "change the model's weight shapes" in capsys.readouterr().err
    assert not store["checkpoints"]


def test_inspect(tmp_path, cli, store, capsys):
    reference = build_hf(TINY_TEXT, TINY_VISION, 32)
    reference.save_pretrained(tmp_path / "hf")
    assert cli.main(["inspect", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "Hugging Face CLIP directory" in out and "hidden_size: 64" in out
    from conversion.files import save_tensor_file
    from conversion.openclip_format import clip_config_from_openclip, expected_openclip_shapes

    shapes = expected_openclip_shapes(clip_config_from_openclip(TINY))
    save_tensor_file({k: torch.zeros(s) for k, s in shapes.items()}, str(tmp_path / "oc.pt"))
    assert cli.main(["inspect", str(tmp_path / "oc.pt")]) == 0
    assert "open_clip state dict" in capsys.readouterr().out
    os.makedirs(tmp_path / "engine_ckpt")
    assert cli.main(["inspect", str(tmp_path / "engine_ckpt")]) == 0
    assert store["inspect"] == [str(tmp_path / "engine_ckpt")]


def test_odd_ffn_needs_padding_for_tp_and_trims_on_export(tmp_path, cli, store, capsys):
    reference = build_openclip(TINY_ODD_FFN, tmp_path)
    from conversion.files import save_tensor_file

    save_tensor_file(reference.state_dict(), str(tmp_path / "odd.safetensors"))
    (tmp_path / "odd.json").write_text(json.dumps(TINY_ODD_FFN))
    args = ["import-open-clip", str(tmp_path / "odd.safetensors"), "--model-config", str(tmp_path / "odd.json"),
            "--tensor-model-parallel-size", "2"]
    assert cli.main(args + ["--out", str(tmp_path / "a")]) == 2
    assert "--pad-ffn-to-multiple 2" in capsys.readouterr().err
    out = str(tmp_path / "b")
    assert cli.main(args + ["--out", out, "--pad-ffn-to-multiple", "2"]) == 0
    exp, _ = store["checkpoints"][os.path.abspath(out)]
    assert (exp.model.vision.ffn_hidden_size, exp.model.text.ffn_hidden_size) == (130, 162)
    assert cli.main(["export-open-clip", out, "--model-config", str(tmp_path / "odd.json"),
                     "--out", str(tmp_path / "back.safetensors")]) == 0
    from conversion.files import load_tensor_file

    back = load_tensor_file(str(tmp_path / "back.safetensors"))
    reference.load_state_dict(back, strict=True)
    assert cli.main(["export-open-clip", out, "--model-name", "ViT-B-32", "--out", str(tmp_path / "c.pt")]) == 2
    assert "differs from the target open_clip config" in capsys.readouterr().err


def _zeros_open_clip(tmp_path, model_cfg, name):
    """An open_clip state dict of zeros for `model_cfg` (+ its config JSON): enough for layout checks."""
    from conversion.files import save_tensor_file
    from conversion.openclip_format import clip_config_from_openclip, expected_openclip_shapes

    shapes = expected_openclip_shapes(clip_config_from_openclip(model_cfg))
    save_tensor_file({k: torch.zeros(s) for k, s in shapes.items()}, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / f"{name}.json").write_text(json.dumps(model_cfg))
    return ["import-open-clip", str(tmp_path / f"{name}.safetensors"), "--model-config", str(tmp_path / f"{name}.json")]


# 6 heads in each tower (width 96, head width 16) and MLP widths 194 and 242 (even; not multiples of 3 or 4).
HEADS6_ODD_FFN = copy.deepcopy(TINY_ODD_FFN)
HEADS6_ODD_FFN["vision_cfg"]["width"] = HEADS6_ODD_FFN["text_cfg"]["width"] = 96
HEADS6_ODD_FFN["text_cfg"]["heads"] = 6


def test_every_layout_problem_reported_at_once_with_advice_that_works(tmp_path, cli, store, capsys):
    args = _zeros_open_clip(tmp_path, HEADS6_ODD_FFN, "h6")
    assert cli.main(args + ["--out", str(tmp_path / "a"), "--tensor-model-parallel-size", "4",
                            "--pipeline-model-parallel-size", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert_checkpoint.py import-open-clip: error: cannot write this model at")
    assert "model.vision.num_attention_heads=6 and model.text.num_attention_heads=6 are not divisible by " \
           "tensor_model_parallel_size=4 (attention heads cannot be padded)" in err
    assert "model.vision.ffn_hidden_size=194 and model.text.ffn_hidden_size=242 are not divisible by " \
           "tensor_model_parallel_size=4" in err
    assert "tensor_model_parallel_size values that work: 1, 2, 3 (with --pad-ffn-to-multiple 3), " \
           "6 (with --pad-ffn-to-multiple 6)" in err
    assert "model.vision.num_layers=2 and model.text.num_layers=2 are not divisible by " \
           "pipeline_model_parallel_size=4" in err and "sizes that work: 1, 2" in err
    assert not store["checkpoints"]
    # the advice, followed, works
    assert cli.main(args + ["--out", str(tmp_path / "b"), "--tensor-model-parallel-size", "3",
                            "--pad-ffn-to-multiple", "3", "--pipeline-model-parallel-size", "2"]) == 0
    (_, dst, tp, pp, _), = store["reshard"]
    assert (dst, tp, pp) == (str(tmp_path / "b"), 3, 2)


def test_existing_out_is_refused_before_anything_is_written(tmp_path, cli, store, capsys):
    args = _zeros_open_clip(tmp_path, TINY, "tiny")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "something").write_text("keep me")
    assert cli.main(args + ["--out", str(out), "--tensor-model-parallel-size", "2"]) == 2
    assert f"{out} exists; choose a new directory" in capsys.readouterr().err
    assert not store["checkpoints"] and not store["reshard"]  # no staging copy either
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".convert-")]
    assert (out / "something").read_text() == "keep me"
    assert cli.main(["reshard", str(tmp_path / "anything"), str(out)]) == 2
    assert f"{out} exists" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["reshard", "src", "dst", "--tensor-model-parallel-size", "0"],
                                  ["reshard", "src", "dst", "--pipeline-model-parallel-size", "-1"],
                                  ["import-hf-clip", "src", "--out", "dst", "--tensor-model-parallel-size", "0"],
                                  ["import-open-clip", "src", "--out", "dst", "--pad-ffn-to-multiple", "0"]])
def test_zero_or_negative_sizes_are_usage_errors(cli, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument" in err and "must be a positive integer" in err
