"""A VLM initialised from a CLIP checkpoint (vision tower) and an LLM checkpoint or a Hugging Face
Llama directory (the LLM), through the key maps of models/vlm/init.py, at TP=1 and TP=2: each part
reproduces its source's own outputs (fp32, 1e-5): the tower's layer-k hidden states (k =
feature_select_index, read from CLIP's own forward by a hook) and the LLM's logits on a text-only
prompt; LoRA adapters attached before loading keep B = 0, so the logits are unchanged."""
import dataclasses

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.vlm_fixtures import IMG, VOCAB, tiny_vlm_config

TOL = 1e-5


def _clip_config(vlm_cfg):
    from models.clip.config import CLIPConfig, TextConfig, VisionConfig
    from models.clip.model import CLIPModel  # noqa: F401 - the family's import

    v = vlm_cfg.vision
    vision = VisionConfig(patch_dim=v.patch_dim, img_h=v.img_h, img_w=v.img_w, num_layers=v.num_layers,
                          hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size,
                          num_attention_heads=v.num_attention_heads, output_dim=16)
    text = TextConfig(vocab_size=100, encoder_seq_length=8, num_layers=1, hidden_size=32, ffn_hidden_size=64,
                      num_attention_heads=4, output_dim=16, make_vocab_size_divisible_by=16)
    return CLIPConfig(output_dim=16, vision=vision, text=text)


def _inputs():
    gen = torch.Generator().manual_seed(9)
    return torch.randn(2, 3, IMG, IMG, generator=gen), torch.randint(0, VOCAB, (2, 10), generator=gen)


def _sources(out_dir):
    """Write the CLIP and LLM checkpoints and a HF Llama directory; return their outputs."""
    from conversion.hf_llama import export_hf_llama
    from engine.checkpoint.tools import write_model_checkpoint
    from models.clip.config import CLIPExperimentConfig
    from models.clip.model import CLIPModel
    from models.llm.config import LLMExperimentConfig
    from models.llm.model import LLMModel
    from parallel.context import initialize_parallel

    initialize_parallel(1, 1, device="cpu", seed=0)
    vlm_cfg = tiny_vlm_config("mlp", feature_select_index=-2)
    torch.manual_seed(100)
    clip = CLIPModel(_clip_config(vlm_cfg))
    torch.manual_seed(200)
    llm = LLMModel(vlm_cfg.llm)
    images, tokens = _inputs()
    captured = {}
    k = vlm_cfg.vision.layers_used  # the output of layer k is the input of layer k + 1 (index k)
    clip.visual.transformer.layers[k].register_forward_pre_hook(
        lambda _m, args, kwargs: captured.update(features=args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True)
    with torch.no_grad():
        clip.encode_image(images)
        logits = llm(tokens)
    paths = {"clip": write_model_checkpoint(f"{out_dir}/clip", CLIPExperimentConfig(model=clip.cfg), clip.state_dict()),
             "llm": write_model_checkpoint(f"{out_dir}/llm", LLMExperimentConfig(model=vlm_cfg.llm), llm.state_dict()),
             "hf": f"{out_dir}/hf"}
    export_hf_llama(llm.state_dict(), vlm_cfg.llm, paths["hf"])
    # [s, b, h] -> [b, patches, h] (class token dropped, as use_cls=False)
    return paths, captured["features"].transpose(0, 1)[:, 1:].clone(), logits


def _load(tp, paths, llm_source, lora):
    from engine.config import load_config
    from models.vlm.config import VLMExperimentConfig
    from models.vlm.init import load_pretrained_parts
    from models.vlm.model import VLMModel
    from parallel.context import initialize_parallel

    ctx = initialize_parallel(tp, 1, device="cpu", seed=0)
    cfg = load_config(VLMExperimentConfig, None, [])
    cfg.model = dataclasses.replace(tiny_vlm_config("mlp", feature_select_index=-2))
    cfg.model.init.vision, cfg.model.init.llm = paths["clip"], paths[llm_source]
    torch.manual_seed(1)
    model = VLMModel(cfg.model)
    if lora:
        from models.common.lora import LoRAConfig, apply_lora

        apply_lora(model, LoRAConfig(rank=4, target_modules=["query", "value", "fc2"]), include=["llm."])
    load_pretrained_parts(cfg, model, ctx)
    images, tokens = _inputs()
    with torch.no_grad():
        return {"features": model.image_features(images), "logits": model(tokens)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return run_ranks(1, _sources, str(tmp_path_factory.mktemp("vlm_init")))[0]


@pytest.mark.parametrize("llm_source,lora", [("llm", False), ("hf", True)])
def test_each_part_reproduces_its_source_at_tp1(sources, llm_source, lora):
    paths, features, logits = sources
    out = run_ranks(1, _load, 1, paths, llm_source, lora)[0]
    torch.testing.assert_close(out["features"], features, atol=TOL, rtol=TOL)
    torch.testing.assert_close(out["logits"], logits, atol=TOL, rtol=TOL)


def test_each_part_reproduces_its_source_at_tp2(sources):
    paths, features, logits = sources
    for out in run_ranks(2, _load, 2, paths, "llm", False):
        torch.testing.assert_close(out["features"], features, atol=TOL, rtol=TOL)
        torch.testing.assert_close(out["logits"], logits, atol=TOL, rtol=TOL)


def test_a_mismatched_tower_is_refused_naming_the_tensor(sources):
    paths, _, _ = sources
    with pytest.raises(RuntimeError, match=r"visual.conv1.weight: shape \(32, 3, 8, 8\) in the checkpoint, \(48, 3, 8, 8\)"):
        run_ranks(1, _load_wider, paths)


def _load_wider(paths):
    from engine.checkpoint.state import Placement
    from models.vlm.init import load_vision
    from models.vlm.model import VLMModel
    from parallel.context import initialize_parallel

    initialize_parallel(1, 1, device="cpu", seed=0)
    cfg = tiny_vlm_config("mlp")
    cfg.vision.hidden_size, cfg.vision.ffn_hidden_size = 48, 96
    load_vision(paths["clip"], VLMModel(cfg), Placement())
