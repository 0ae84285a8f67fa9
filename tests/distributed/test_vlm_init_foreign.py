"""`model.init.vision` from an open_clip state dict (a .safetensors file with no config: its shape
inferred, heads from model.vision; and a `local-dir:` directory with open_clip_config.json) and from a
Hugging Face CLIP directory, converted in memory by conversion/: the VLM tower's features (layer
feature_select_index = -2, class token dropped) equal the reference library's own forward pass, at
TP=1 and TP=2, within 1e-5 (fp32; the conversion tests' tolerance). References are tiny random
open_clip / transformers models built here (every parameter noised so norms and biases count);
nothing is downloaded. A Hugging Face tower of another shape is refused by preflight, key by key.
"""
import json
import os

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.vlm_fixtures import IMG, tiny_vlm_config

TOL = 1e-5


def _noised(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def _images():
    return torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(4))


def _vlm_config(source: str):
    cfg = tiny_vlm_config("mlp", feature_select_index=-2)
    if source == "hf":
        cfg.vision.activation = "quick_gelu"  # HF CLIP's default hidden_act
    return cfg


def _openclip_sources(out_dir: str):
    """open_clip's own layer-k output (k = layers used) and two files of the same weights."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    v = _vlm_config("open_clip").vision
    model_cfg = {"embed_dim": 16,
                 "vision_cfg": {"image_size": IMG, "patch_size": v.patch_dim, "layers": v.num_layers,
                                "width": v.hidden_size, "head_width": v.hidden_size // v.num_attention_heads,
                                "mlp_ratio": v.ffn_hidden_size / v.hidden_size},
                 "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 4, "layers": 1}}
    torch.manual_seed(0)
    model = _noised(open_clip.model.CLIP(**model_cfg), 1)
    captured = {}
    model.visual.transformer.resblocks[v.layers_used - 1].register_forward_hook(
        lambda _m, _a, out: captured.update(features=out))
    with torch.no_grad():
        model.encode_image(_images())
    features = captured["features"]
    if not getattr(model.visual.transformer, "batch_first", True):
        features = features.transpose(0, 1)
    state = {k: t.contiguous() for k, t in model.state_dict().items()}
    path = os.path.join(out_dir, "open_clip_tiny.safetensors")  # no config beside it: inferred
    save_file(state, path)
    local_dir = os.path.join(out_dir, "open_clip_local_dir")
    os.makedirs(local_dir)
    save_file(state, os.path.join(local_dir, "open_clip_model.safetensors"))
    with open(os.path.join(local_dir, "open_clip_config.json"), "w") as fh:
        json.dump({"model_cfg": model_cfg}, fh)
    return {"open_clip_file": path, "open_clip_dir": local_dir}, features[:, 1:].clone()


def _hf_source(out_dir: str, hidden_size: int | None = None):
    """transformers' own hidden_states[feature_select_index] and the saved directory."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    v = _vlm_config("hf").vision
    vision = dict(hidden_size=hidden_size or v.hidden_size, intermediate_size=v.ffn_hidden_size,
                  num_hidden_layers=v.num_layers, num_attention_heads=v.num_attention_heads, image_size=IMG,
                  patch_size=v.patch_dim, hidden_act="quick_gelu")
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=8, hidden_act="quick_gelu", eos_token_id=2)
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = _noised(transformers.CLIPModel(config), 2)
    with torch.no_grad():
        out = model.vision_model(pixel_values=_images(), output_hidden_states=True)
    directory = os.path.join(out_dir, f"hf_clip{hidden_size or ''}")
    model.save_pretrained(directory)
    return directory, out.hidden_states[v.feature_select_index][:, 1:].clone()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("vlm_init_foreign"))
    paths, openclip_features = _openclip_sources(out_dir)
    paths["hf"], hf_features = _hf_source(out_dir)
    want = {"open_clip_file": openclip_features, "open_clip_dir": openclip_features, "hf": hf_features}
    return paths, want


def _features(tp: int, paths: dict) -> dict:
    from engine.checkpoint.state import Placement
    from models.vlm.init import load_vision
    from models.vlm.model import VLMModel
    from parallel.context import initialize_parallel

    ctx = initialize_parallel(tp, 1, device="cpu", seed=0)
    out = {}
    for name, path in paths.items():
        torch.manual_seed(7)  # the same random tower before loading, for every source
        model = VLMModel(_vlm_config("hf" if name == "hf" else "open_clip"), use_cpu_initialization=True)
        load_vision(path, model, Placement.from_ctx(ctx))
        with torch.no_grad():
            out[name] = model.image_features(_images())
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_tower_features_equal_the_reference_library(sources, tp):
    paths, want = sources
    for rank_out in run_ranks(tp, _features, tp, paths):
        for name, features in want.items():
            torch.testing.assert_close(rank_out[name], features, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_preflight_refuses_a_hugging_face_tower_of_another_shape(sources, tmp_path):
    from models.vlm.init import clip_source_kind, vision_checkpoint_problems

    paths, _ = sources
    assert {name: clip_source_kind(path) for name, path in paths.items()} == {
        "open_clip_file": "open_clip", "open_clip_dir": "open_clip", "hf": "hf"}
    assert vision_checkpoint_problems(paths["hf"], _vlm_config("hf").vision) == []
    directory, _ = _hf_source(str(tmp_path), hidden_size=48)
    assert clip_source_kind(directory) == "hf"
    text = "\n".join(vision_checkpoint_problems(directory, _vlm_config("hf").vision))
    assert "the Hugging Face CLIP tower has another shape than model.vision" in text
    assert "model.vision.hidden_size=32 here, 48 in the checkpoint" in text


def _features_pp(paths: dict) -> dict:
    from engine.checkpoint.state import Placement
    from models.vlm.init import load_vision
    from models.vlm.model import VLMModel
    from parallel.context import initialize_parallel

    ctx = initialize_parallel(1, 2, device="cpu", seed=0)
    model = VLMModel(_vlm_config("open_clip"), use_cpu_initialization=True)
    load_vision(paths["open_clip_file"], model, Placement.from_ctx(ctx))  # the last stage holds no tower
    if not model.pre_process:
        return {"stage": ctx.pp_rank, "has_tower": hasattr(model, "vision")}
    with torch.no_grad():
        return {"stage": ctx.pp_rank, "has_tower": True, "features": model.image_features(_images())}


def test_tower_loads_on_the_first_pipeline_stage_only(sources):
    paths, want = sources
    first, last = run_ranks(2, _features_pp, paths)
    assert (first["stage"], last["stage"], last["has_tower"]) == (0, 1, False)
    torch.testing.assert_close(first["features"], want["open_clip_file"], atol=TOL, rtol=TOL)
