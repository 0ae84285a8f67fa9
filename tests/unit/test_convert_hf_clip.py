"""Hugging Face CLIPModel <-> this project's CLIP: embeddings equal within 1e-5 (fp32) both ways,
strict loads, EOS pooling rules, errors for mismatched architectures and unreadable files.

References are `transformers.CLIPModel`s built from small random `CLIPConfig`s; nothing is downloaded.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from conversion.clip_layout import CheckpointFileError, CheckpointMismatchError, UnsupportedArchitectureError
from conversion.hf_clip_format import (
    clip_config_from_hf, clip_to_hf_state_dict, expected_hf_shapes, export_hf_clip, hf_config_from_clip,
    hf_to_clip_state_dict, import_hf_clip, read_hf_clip,
)

TOL = 1e-5

# vocab 300 pads to 384 rows at TP=1 and 512 at TP=2.
TINY_TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=12, hidden_act="quick_gelu", eos_token_id=2)  # 2: HF's argmax rule
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8, hidden_act="quick_gelu")
# The other branches: exact GELU, EOS pooled at the first `eos_token_id`, eps 1e-6, other widths.
VARIANT_TEXT = dict(vocab_size=200, hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=2,
                    max_position_embeddings=10, hidden_act="gelu", eos_token_id=7, layer_norm_eps=1e-6)
VARIANT_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=3,
                      image_size=24, patch_size=6, hidden_act="gelu", layer_norm_eps=1e-6)
CASES = {"quickgelu-argmax": (TINY_TEXT, TINY_VISION, 32), "gelu-eos": (VARIANT_TEXT, VARIANT_VISION, 24)}


def require_transformers():
    try:
        import transformers
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("CI"):
            raise
        pytest.skip(f"transformers does not import here ({type(exc).__name__}: {exc}); pip install -e '.[test]'")
    transformers.logging.set_verbosity_error()
    return transformers


def build_hf(text: dict, vision: dict, projection_dim: int, seed: int = 0):
    """A random HF CLIPModel; every parameter gets noise so LayerNorm affine terms and biases count."""
    transformers = require_transformers()
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def hf_inputs(text: dict, vision: dict, batch: int = 4, seed: int = 1):
    """Images and ids; EOS (or the highest id, for eos_token_id=2) at a different position per row."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, vision.get("num_channels", 3), vision["image_size"], vision["image_size"],
                         generator=gen)
    ctx, vocab, eos = text["max_position_embeddings"], text["vocab_size"], text["eos_token_id"]
    pos = torch.randint(2, ctx, (batch,), generator=gen)
    if eos == 2:
        ids = torch.randint(3, vocab - 1, (batch, ctx), generator=gen)
        ids[torch.arange(batch), pos] = vocab - 1
    else:  # higher ids after the EOS: argmax pooling would pick another position
        ids = torch.randint(eos + 1, vocab, (batch, ctx), generator=gen)
        ids[torch.arange(batch), pos] = eos
        ids[torch.arange(batch), (pos + 1).clamp(max=ctx - 1)] = eos  # pool at the first of two
    return images, ids


def _pooled(out):
    return getattr(out, "pooler_output", out)  # transformers 5 returns an output object, 4.x a tensor


def hf_embeddings(model, images, ids):
    with torch.no_grad():
        image = _pooled(model.get_image_features(pixel_values=images))
        text = _pooled(model.get_text_features(input_ids=ids))
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def our_model(cfg, full_state):
    from models.clip.model import CLIPModel

    model = CLIPModel(cfg).eval()
    model.load_state_dict(full_state, strict=True)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_hf_round_trip_tp1(single_rank, tmp_path, case):
    transformers = require_transformers()
    text, vision, proj = CASES[case]
    reference = build_hf(text, vision, proj)
    reference.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors
    images, ids = hf_inputs(text, vision)
    ref_image, ref_text = hf_embeddings(reference, images, ids)

    cfg, full = import_hf_clip(str(tmp_path / "hf"))
    assert cfg.text.eot_token_id == (-1 if text["eos_token_id"] == 2 else text["eos_token_id"])
    assert cfg.vision.activation == vision["hidden_act"]
    assert cfg.text.layernorm_epsilon == text.get("layer_norm_eps", 1e-5)
    ours = our_model(cfg, full)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), ref_image, atol=TOL, rtol=TOL)
        torch.testing.assert_close(ours.encode_text(ids), ref_text, atol=TOL, rtol=TOL)
    torch.testing.assert_close(ours.logit_scale, reference.logit_scale)

    # Back: the converted state dict loads strictly into the reference architecture ...
    fresh = transformers.CLIPModel(reference.config).eval()
    fresh.load_state_dict(clip_to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    # ... and the exported directory loads with from_pretrained, same outputs.
    export_hf_clip(ours.state_dict(), cfg, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    loaded = transformers.CLIPModel.from_pretrained(str(tmp_path / "out")).eval()
    for a, b in zip(hf_embeddings(loaded, images, ids), (ref_image, ref_text)):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    assert clip_config_from_hf(json.loads((tmp_path / "out" / "config.json").read_text())) == cfg


def test_sharded_safetensors_and_persistent_position_ids(single_rank, tmp_path):
    reference = build_hf(TINY_TEXT, TINY_VISION, 32)
    reference.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    cfg, full = import_hf_clip(str(tmp_path / "hf"))
    state = clip_to_hf_state_dict(full, cfg)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(state[name], tensor, atol=0, rtol=0, msg=name)
    # Older checkpoints stored the position_ids buffers: accepted and dropped.
    old = dict(reference.state_dict())
    old["text_model.embeddings.position_ids"] = torch.arange(12)[None]
    old["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    assert hf_to_clip_state_dict(old, cfg).keys() == full.keys()


def test_config_defaults_and_old_key_names():
    """config.json written by save_pretrained omits default values; very old ones use *_config_dict."""
    cfg = clip_config_from_hf({"model_type": "clip", "text_config_dict": {"eos_token_id": 2}, "vision_config": {}})
    assert (cfg.vision.hidden_size, cfg.vision.patch_dim, cfg.vision.num_layers) == (768, 32, 12)
    assert (cfg.text.hidden_size, cfg.text.vocab_size, cfg.text.encoder_seq_length) == (512, 49408, 77)
    assert cfg.vision.activation == cfg.text.activation == "quick_gelu" and cfg.text.eot_token_id == -1
    assert cfg.output_dim == 512
    assert clip_config_from_hf({"model_type": "clip"}).text.eot_token_id == 49407  # today's default


def test_mismatched_architecture_lists_every_problem(tmp_path):
    reference = build_hf(TINY_TEXT, TINY_VISION, 32)
    reference.save_pretrained(tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config["vision_config"]["num_hidden_layers"] = 3  # the weights hold 2 vision layers
    config["projection_dim"] = 16  # and 32-wide projections
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError) as info:
        import_hf_clip(str(tmp_path / "hf"))
    message = str(info.value)
    assert "vision_model.encoder.layers.2.self_attn.q_proj.weight" in message  # missing
    assert "visual_projection.weight: found (32, 64), expected (16, 64)" in message
    assert len(info.value.missing) == 16 and not info.value.unexpected
    state = dict(reference.state_dict())
    state["text_model.encoder.layers.9.mlp.fc1.weight"] = torch.zeros(1)
    cfg = clip_config_from_hf(reference.config.to_dict())
    with pytest.raises(CheckpointMismatchError, match="layers.9.mlp.fc1.weight"):
        hf_to_clip_state_dict(state, cfg)


def test_truncated_or_corrupt_files_are_named(tmp_path):
    cfg = clip_config_from_hf({"model_type": "clip", "text_config": TINY_TEXT, "vision_config": TINY_VISION,
                               "projection_dim": 32})
    state = {k: torch.randn(s) for k, s in expected_hf_shapes(cfg).items()}
    from conversion.files import save_tensor_file

    directory = tmp_path / "hf"
    save_tensor_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf_config_from_clip(cfg)))
    assert read_hf_clip(str(directory))[1].keys() == state.keys()
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointFileError, match=str(weights)):
        import_hf_clip(str(directory))
    weights.unlink()
    with pytest.raises(CheckpointFileError, match="model.safetensors"):
        import_hf_clip(str(directory))
    (directory / "config.json").write_text('{"model_type": "clip", "text_con')
    with pytest.raises(CheckpointFileError, match="config.json"):
        import_hf_clip(str(directory))
    with pytest.raises(CheckpointFileError, match="not a directory"):
        import_hf_clip(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("change, needle", [
    ({"model_type": "siglip"}, "siglip"),
    ({"text_config": {"hidden_act": "gelu_new"}}, "gelu_new"),
    ({"vision_config": {"image_size": 30}}, "divisible"),
])
def test_unsupported_hf_features_are_named(change, needle):
    config = {"model_type": "clip", "text_config": dict(TINY_TEXT), "vision_config": dict(TINY_VISION)}
    for key, value in change.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    with pytest.raises(UnsupportedArchitectureError, match=needle):
        clip_config_from_hf(config)


def test_export_rejects_what_hf_cannot_express():
    cfg = clip_config_from_hf({"model_type": "clip", "text_config": TINY_TEXT, "vision_config": TINY_VISION})
    cfg.vision.global_average_pool = True
    with pytest.raises(UnsupportedArchitectureError, match="global_average_pool"):
        hf_config_from_clip(cfg)
    cfg.vision.global_average_pool = False
    cfg.text.eot_token_id = 2  # HF would read eos_token_id=2 as argmax pooling
    with pytest.raises(UnsupportedArchitectureError, match="eot_token_id=2"):
        hf_config_from_clip(cfg)
