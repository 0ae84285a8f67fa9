"""open_clip <-> this project's CLIP: embeddings equal within 1e-5 (fp32) both ways, strict loads,
errors for mismatched architectures and unreadable files, key/shape coverage of the real ViT sizes.

References are open_clip models built locally with random weights (`open_clip.create_model(...,
pretrained=None)`), nothing is downloaded. open_clip imports torchvision: the test environment needs
a torchvision that loads beside its torch (see setup.py's `test` extra).
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from conversion.clip_layout import (
    CheckpointFileError, CheckpointMismatchError, UnsupportedArchitectureError, expected_clip_shapes, fuse_qkv,
    pad_ffn, split_qkv,
)
from conversion.files import load_tensor_file, save_tensor_file
from conversion.openclip_format import (
    BUILTIN_MODEL_CONFIGS, clip_config_from_openclip, clip_to_openclip_state_dict, expected_openclip_shapes,
    export_openclip, import_openclip, openclip_config_from_clip, openclip_config_from_state_dict,
    openclip_model_config, openclip_to_clip_state_dict, read_openclip, write_openclip,
)

TOL = 1e-5
REAL_SIZES = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-g-14"]

# A tiny open_clip config in open_clip's own format. vocab 300 pads to 384 rows at TP=1 and 512 at TP=2.
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 12, "vocab_size": 300, "width": 64, "heads": 4, "layers": 2}}
# The other branches: QuickGELU, mean pooling over patches, EOS pooling at a fixed id, LayerNorm eps 1e-6,
# a non-default MLP ratio.
TINY_VARIANT = {"embed_dim": 24, "quick_gelu": True,
                "vision_cfg": {"image_size": 24, "layers": 1, "width": 48, "head_width": 12, "patch_size": 6,
                               "mlp_ratio": 2.5, "pool_type": "avg", "norm_kwargs": {"eps": 1e-6}},
                "text_cfg": {"context_length": 10, "vocab_size": 200, "width": 32, "heads": 2, "layers": 3,
                             "pool_type": "eos", "eos_id": 7, "norm_kwargs": {"eps": 1e-6}}}


# MLP widths no TP size > 1 divides (int(64 * 2.03) = 129, int(64 * 2.53) = 161), as ViT-g-14's 6143.
TINY_ODD_FFN = copy.deepcopy(TINY)
TINY_ODD_FFN["vision_cfg"]["mlp_ratio"] = 2.03
TINY_ODD_FFN["text_cfg"]["mlp_ratio"] = 2.53


def require_open_clip():
    """open_clip, or a skip outside CI (in CI a missing or broken install is a failure)."""
    try:
        import open_clip
    except Exception as exc:  # noqa: BLE001 - a torchvision built for another torch raises RuntimeError
        if os.environ.get("CI"):
            raise
        pytest.skip(f"open_clip does not import here ({type(exc).__name__}: {exc}); install the test extra "
                    "with a matching torch/torchvision pair, e.g. torch==2.14.1 torchvision==0.29.1")
    return open_clip


def build_openclip(model_cfg: dict, tmp_dir, seed: int = 0):
    """A random open_clip model via `open_clip.create_model(name, pretrained=None)` from a config file.

    Every parameter gets noise on top of open_clip's init, so LayerNorm affine terms and biases
    (zero or one at init) take part in the comparison.
    """
    open_clip = require_open_clip()
    name = f"mmengine-test-{abs(hash(json.dumps(model_cfg, sort_keys=True)))}"
    path = os.path.join(str(tmp_dir), f"{name}.json")
    with open(path, "w") as f:
        json.dump(model_cfg, f)
    open_clip.add_model_config(path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def tiny_inputs(model_cfg: dict, batch: int = 4, seed: int = 1):
    """Images and token ids; each row has its end-of-text token (or EOS id) at a different position."""
    vcfg, tcfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, vcfg["image_size"], vcfg["image_size"], generator=gen)
    ctx, vocab = tcfg["context_length"], tcfg["vocab_size"]
    eot = torch.randint(2, ctx, (batch,), generator=gen)
    if tcfg.get("pool_type") == "eos":  # EOS somewhere, higher ids after it: argmax would pool elsewhere
        tokens = torch.randint(tcfg["eos_id"] + 1, vocab, (batch, ctx), generator=gen)
        tokens[torch.arange(batch), eot] = tcfg["eos_id"]
    else:
        tokens = torch.randint(1, vocab - 1, (batch, ctx), generator=gen)
        tokens[torch.arange(batch), eot] = vocab - 1
    return images, tokens


def openclip_embeddings(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


def our_embeddings(cfg, full_state):
    from models.clip.model import CLIPModel

    model = CLIPModel(cfg).eval()
    model.load_state_dict(full_state, strict=True)
    return model


def test_fused_qkv_is_megatron_head_interleaved():
    heads, width = 3, 6  # head_dim 2
    q, k, v = (torch.arange(width).float() + 100 * i for i in range(3))  # q 0..5, k 100.., v 200..
    fused = fuse_qkv(q, k, v, heads)
    # head 0: q rows 0-1, k rows 0-1, v rows 0-1; then head 1 ...
    assert fused[:6].tolist() == [0, 1, 100, 101, 200, 201]
    assert fused[6:12].tolist() == [2, 3, 102, 103, 202, 203]
    w = torch.randn(3 * width, 5)
    assert torch.equal(fuse_qkv(*split_qkv(w, heads), heads), w)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fuse_qkv(*w.chunk(3), heads), heads), w.chunk(3)))


@pytest.mark.parametrize("model_cfg", [TINY, TINY_VARIANT], ids=["gelu-tok-argmax", "quickgelu-avg-eos"])
def test_expected_shapes_are_the_models(single_rank, model_cfg):
    from models.clip.model import CLIPModel

    cfg = clip_config_from_openclip(model_cfg)
    state = CLIPModel(cfg).state_dict()
    assert {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else None) for k, v in state.items()} == \
        expected_clip_shapes(cfg)


@pytest.mark.parametrize("model_cfg", [TINY, TINY_VARIANT], ids=["gelu-tok-argmax", "quickgelu-avg-eos"])
def test_open_clip_round_trip_tp1(single_rank, tmp_path, model_cfg):
    reference = build_openclip(model_cfg, tmp_path)
    images, tokens = tiny_inputs(model_cfg)
    ref_image, ref_text = openclip_embeddings(reference, images, tokens)

    cfg, full = import_openclip(reference.state_dict(), model_cfg)
    ours = our_embeddings(cfg, full)
    with torch.no_grad():
        image, text = ours.encode_image(images), ours.encode_text(tokens)
    torch.testing.assert_close(image, ref_image, atol=TOL, rtol=TOL)
    torch.testing.assert_close(text, ref_text, atol=TOL, rtol=TOL)
    torch.testing.assert_close(ours.logit_scale, reference.logit_scale)

    # Back: a fresh open_clip model from the exported config takes the weights strictly.
    back_cfg, back_state = export_openclip(ours.state_dict(), cfg)
    assert clip_config_from_openclip(back_cfg) == cfg
    fresh = build_openclip(back_cfg, tmp_path, seed=5)
    fresh.load_state_dict(back_state, strict=True)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    image2, text2 = openclip_embeddings(fresh, images, tokens)
    torch.testing.assert_close(image2, ref_image, atol=TOL, rtol=TOL)
    torch.testing.assert_close(text2, ref_text, atol=TOL, rtol=TOL)


def test_custom_text_layout_and_training_checkpoint(single_rank, tmp_path):
    """CustomTextCLIP names the text tower text.*; open_clip_train saves {'state_dict': {'module.*'}}."""
    reference = build_openclip(TINY, tmp_path)
    images, tokens = tiny_inputs(TINY)
    ref_image, ref_text = openclip_embeddings(reference, images, tokens)
    cfg = clip_config_from_openclip(TINY)
    full = openclip_to_clip_state_dict(reference.state_dict(), cfg)
    custom = clip_to_openclip_state_dict(full, cfg, text_prefix="text.")
    assert "text.transformer.resblocks.0.attn.in_proj_weight" in custom
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in custom.items()}}, path)
    state, _, _ = read_openclip(str(path))
    ours = our_embeddings(cfg, openclip_to_clip_state_dict(state, cfg))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), ref_image, atol=TOL, rtol=TOL)
        torch.testing.assert_close(ours.encode_text(tokens), ref_text, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_files_and_local_dir(single_rank, tmp_path, suffix):
    open_clip = require_open_clip()
    reference = build_openclip(TINY, tmp_path)
    path = str(tmp_path / f"weights{suffix}")
    save_tensor_file(reference.state_dict(), path)
    state, _, _ = read_openclip(path)
    cfg, full = import_openclip(state, openclip_config_from_state_dict(state, vision_head_width=16, text_heads=4))
    assert cfg == clip_config_from_openclip(TINY)
    # Export as an open_clip local-dir and load it through open_clip's own factory.
    out = str(tmp_path / "local")
    model_cfg, oc_state = export_openclip(full, cfg)
    write_openclip(oc_state, model_cfg, out)
    loaded = open_clip.create_model(f"local-dir:{out}").eval()
    images, tokens = tiny_inputs(TINY)
    for a, b in zip(openclip_embeddings(loaded, images, tokens), openclip_embeddings(reference, images, tokens)):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_mismatched_architecture_lists_every_problem(tmp_path):
    wrong_cfg = copy.deepcopy(TINY)
    wrong_cfg["vision_cfg"]["layers"] = 3  # the checkpoint has a third vision block
    wrong_cfg["text_cfg"]["width"] = 32  # and a narrower text tower (heads 4 still divide it)
    state = build_openclip(wrong_cfg, tmp_path).state_dict()
    del state["visual.ln_post.bias"]
    with pytest.raises(CheckpointMismatchError) as info:
        import_openclip(state, TINY)
    message = str(info.value)
    assert "missing keys" in message and "visual.ln_post.bias" in message
    assert "unexpected keys" in message and "visual.transformer.resblocks.2.attn.in_proj_weight" in message
    assert "shape mismatches" in message and "token_embedding.weight: found (300, 32), expected (300, 64)" in message
    assert info.value.missing == ["visual.ln_post.bias"]
    assert len(info.value.unexpected) == 12  # every tensor of vision block 2


def test_mismatched_our_state_dict_on_export():
    cfg = clip_config_from_openclip(TINY)
    state = {k: torch.zeros(s) for k, s in expected_clip_shapes(cfg).items() if s is not None}
    state["visual.proj.weight"] = torch.zeros(7, 64)
    state.pop("text.text_projection.weight")
    state["visual.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as info:
        clip_to_openclip_state_dict(state, cfg)
    message = str(info.value)
    assert "text.text_projection.weight" in message and "visual.extra" in message
    assert "visual.proj.weight: found (7, 64), expected (32, 64)" in message


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_or_corrupt_file_is_named(tmp_path, suffix):
    cfg = clip_config_from_openclip(TINY)
    path = tmp_path / f"model{suffix}"
    save_tensor_file({k: torch.randn(s) for k, s in expected_openclip_shapes(cfg).items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFileError, match=str(path)) as info:
        load_tensor_file(str(path))
    assert "truncated or corrupt" in str(info.value)
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointFileError, match=str(path)):
        load_tensor_file(str(path))
    with pytest.raises(CheckpointFileError, match="no such file"):
        load_tensor_file(str(tmp_path / "absent.safetensors"))


@pytest.mark.parametrize("change, needle", [
    ({"vision_cfg": {"ls_init_value": 1e-5}}, "ls_init_value"),
    ({"vision_cfg": {"attentional_pool": True}}, "attentional_pool"),
    ({"vision_cfg": {"timm_model_name": "vit_base_patch16_224"}}, "timm_model_name"),
    ({"vision_cfg": {"layers": [3, 4, 6, 3]}}, "ModifiedResNet"),
    ({"vision_cfg": {"pool_type": "avg", "final_ln_after_pool": True}}, "final_ln_after_pool"),
    ({"text_cfg": {"hf_model_name": "roberta-base"}}, "hf_model_name"),
    ({"text_cfg": {"proj_bias": True}}, "proj_bias"),
    ({"text_cfg": {"no_causal_mask": True}}, "no_causal_mask"),
    ({"text_cfg": {"pool_type": "last"}}, "pool_type"),
    ({"init_logit_bias": -10}, "logit bias"),
])
def test_unsupported_open_clip_features_are_named(change, needle):
    model_cfg = copy.deepcopy(TINY)
    for key, value in change.items():
        if isinstance(value, dict):
            model_cfg[key].update(value)
        else:
            model_cfg[key] = value
    with pytest.raises(UnsupportedArchitectureError, match=needle):
        clip_config_from_openclip(model_cfg)


def test_export_rejects_what_open_clip_cannot_express():
    cfg = clip_config_from_openclip(TINY)
    cfg.text.activation = "quick_gelu"  # vision stays gelu: open_clip has one flag
    with pytest.raises(UnsupportedArchitectureError, match="quick_gelu"):
        openclip_config_from_clip(cfg)


@pytest.mark.parametrize("name", REAL_SIZES)
def test_real_sizes_key_and_shape_coverage(single_rank, name):
    """The mapping covers open_clip's real configs, on the meta device (no weights allocated): open_clip's
    state dict -> ours has exactly `CLIPModel(cfg)`'s names and shapes, and back exactly open_clip's."""
    from models.clip.model import CLIPModel

    model_cfg = openclip_model_config(name)
    assert BUILTIN_MODEL_CONFIGS[name] == model_cfg  # the table used when open_clip is not installed
    cfg = clip_config_from_openclip(model_cfg)
    open_clip = require_open_clip()
    with torch.device("meta"):
        reference = open_clip.model.CLIP(**model_cfg)
        ours = CLIPModel(cfg, perform_initialization=False)
    oc_state = reference.state_dict()
    assert {k: tuple(v.shape) for k, v in oc_state.items()} == expected_openclip_shapes(cfg)
    full = openclip_to_clip_state_dict(oc_state, cfg)
    our_state = ours.state_dict()
    assert full.keys() == our_state.keys()
    for key, value in our_state.items():
        if isinstance(value, torch.Tensor):
            assert tuple(full[key].shape) == tuple(value.shape), key
    reference.load_state_dict(clip_to_openclip_state_dict(full, cfg), strict=True, assign=True)
    assert clip_config_from_openclip(openclip_config_from_clip(cfg)) == cfg


def test_padded_ffn_is_exact_and_trims_back(single_rank, tmp_path):
    reference = build_openclip(TINY_ODD_FFN, tmp_path)
    images, tokens = tiny_inputs(TINY_ODD_FFN)
    ref = openclip_embeddings(reference, images, tokens)
    cfg, full = import_openclip(reference.state_dict(), TINY_ODD_FFN)
    assert (cfg.vision.ffn_hidden_size, cfg.text.ffn_hidden_size) == (129, 161)
    padded_cfg, padded = pad_ffn(cfg, full, 8)
    assert (padded_cfg.vision.ffn_hidden_size, padded_cfg.text.ffn_hidden_size) == (136, 168)
    ours = our_embeddings(padded_cfg, padded)
    with torch.no_grad():
        for a, b in zip((ours.encode_image(images), ours.encode_text(tokens)), ref):
            torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    # Exported for the original config, the padding goes and open_clip loads it strictly.
    back_cfg, back = export_openclip(ours.state_dict(), padded_cfg, target=TINY_ODD_FFN)
    assert back_cfg == TINY_ODD_FFN
    reference.load_state_dict(back, strict=True)
    for a, b in zip(openclip_embeddings(reference, images, tokens), ref):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    # Units that learned weights are not padding: no silent trim; another architecture: named.
    trained = dict(padded)
    trained["visual.transformer.layers.1.mlp.linear_fc2.weight"] = torch.ones_like(
        trained["visual.transformer.layers.1.mlp.linear_fc2.weight"])
    with pytest.raises(UnsupportedArchitectureError, match="not zero padding"):
        export_openclip(trained, padded_cfg, target=TINY_ODD_FFN)
    with pytest.raises(UnsupportedArchitectureError, match="model.vision.ffn_hidden_size: 136 vs 256"):
        export_openclip(padded, padded_cfg, target=TINY)
    deeper = copy.deepcopy(TINY_ODD_FFN)
    deeper["text_cfg"]["layers"] = 3
    with pytest.raises(UnsupportedArchitectureError, match="model.text.num_layers: 2 vs 3"):
        export_openclip(padded, padded_cfg, target=deeper)
