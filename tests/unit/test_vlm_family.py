"""The VLM family's seam: registry entry, configs/vlm/*.yaml load and build their model on the meta
device (parameter counts from the published shapes), freezing per stage (trainable counts; frozen
parameters get no optimizer state), layout and preflight problems that name their key."""
import glob
import os

import pytest
import torch

from engine.config import load_config
from engine.family import get_family
from engine.schema import BARE_KEYS
from models.vlm.config import VLMExperimentConfig


def _cfg(path, *overrides):
    return load_config(VLMExperimentConfig, path, list(overrides), BARE_KEYS)


def test_registered():
    family = get_family("vlm")
    assert family.config_cls is VLMExperimentConfig and family.entry_point == "examples/pretrain_vlm.py"


def _vit_layer(h, ffn):
    return 4 * h * h + 4 * h + 2 * h * ffn + ffn + h + 4 * h  # qkv+proj (+biases), fc1+fc2 (+biases), two norms


def _llama(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, tied=True):
    head = hidden // heads
    attention = hidden * (heads * head + 2 * kv_heads * head) + heads * head * hidden
    return vocab * hidden * (1 if tied else 2) + layers * (attention + 3 * hidden * ffn + 2 * hidden) + hidden


@pytest.mark.parametrize("name, trainable", [("pretrain", "connector"), ("instruct", "connector+llm"),
                                              ("instruct_lora", "connector+lora")])
def test_real_size_configs_on_meta_device(single_rank, name, trainable):
    from models.common.lora import LoRAConfig, apply_lora, count_parameters
    from models.vlm.model import VLMModel, freeze_parts

    cfg = _cfg(f"configs/vlm/{name}.yaml")
    m = cfg.model
    with torch.device("meta"):
        model = VLMModel(m, use_cpu_initialization=True, perform_initialization=False)
    if m.lora.enabled:
        apply_lora(model, LoRAConfig(rank=m.lora.rank, alpha=m.lora.alpha, target_modules=m.lora.target_modules),
                   include=["llm."])
    freeze_parts(model, m.freeze.vision, m.freeze.connector, m.freeze.llm, lora=m.lora.enabled)
    # CLIP B/16 up to layer -2 (11 of 12 layers, no final norm or projection), mlp2x_gelu, Llama-3.2-1B
    vision = 768 * 3 * 16 * 16 + 768 + 197 * 768 + 2 * 768 + 11 * _vit_layer(768, 3072)
    connector = 768 * 2048 + 2048 + 2048 * 2048 + 2048
    llm = _llama()
    lora = 16 * 128 * ((2048 + 3072) + (2048 + 2048) + (2048 + 2 * 8192) + (8192 + 2048))  # qkv, proj, fc1, fc2
    trains, total = count_parameters(model, 1)
    assert total == vision + connector + llm + (lora if m.lora.enabled else 0)
    want = {"connector": connector, "connector+llm": connector + llm, "connector+lora": connector + lora}[trainable]
    assert trains == want
    assert m.image_tokens == 196


def test_frozen_parameters_get_no_optimizer_state(single_rank):
    from engine.optim import build_optimizer
    from models.vlm.model import VLMModel, freeze_parts
    from tests.distributed.vlm_fixtures import conversation_batches, tiny_vlm_config

    cfg = _cfg("configs/vlm/tiny.yaml")
    torch.manual_seed(0)
    model = VLMModel(tiny_vlm_config("mlp"))
    freeze_parts(model, vision=True, connector=False, llm=True)
    optimizer = build_optimizer(model, cfg.optim)
    batch = conversation_batches(model.image_tokens, 1, text_only=())[0]
    model(batch["tokens"], batch["images"], batch["image_index"], batch["labels"], batch["loss_mask"]).backward()
    optimizer.step()
    with_state = {id(p) for p in optimizer.params if optimizer.optimizer.state.get(p)}  # ReplicatedAdamW (fp32)
    named = dict(model.named_parameters())
    assert all(named[n].grad is None for n in named if not n.startswith("connector."))
    connector = {id(p) for n, p in named.items() if n.startswith("connector.")}
    assert {id(p) for p in optimizer.params} == connector
    assert with_state == connector


def test_layout_problems_name_their_keys():
    family = get_family("vlm")
    cfg = _cfg("configs/vlm/tiny.yaml", "model.connector.type=perceiver", "model.connector.perceiver.n_heads=6")
    problems = family.check_layout(cfg, 4, 3)
    text = "\n".join(problems)
    assert "model.llm.num_layers=2 is not divisible by pipeline_model_parallel_size=3" in text
    assert "model.llm.num_query_groups=2 is not divisible by tensor_model_parallel_size=4" in text
    assert "model.connector.perceiver.n_heads=6 is not divisible by tensor_model_parallel_size=4" in text
    assert family.check_layout(_cfg("configs/vlm/tiny.yaml"), 2, 2) == []


def test_preflight_names_the_problem(tmp_path):
    family = get_family("vlm")
    cfg = _cfg("configs/vlm/tiny.yaml", "model.llm.vocab_size=20", "model.vision.feature_select_index=5",
               f"model.init.vision={tmp_path}/none", "model.llm.attention_backend=flash")
    text = "\n".join(family.preflight(cfg))
    assert "model.llm.attention_backend='flash' is not read" in text and "use model.attention_backend" in text
    assert "model.llm.vocab_size=20 is smaller than the synthetic set's" in text
    assert "model.vision.feature_select_index=5" in text
    assert f"model.init.vision={tmp_path}/none: no such file" in text
    cfg = _cfg("configs/vlm/tiny.yaml", f"data.train_data={tmp_path}/x.jsonl", "data.text_batch_fraction=0.2")
    text = "\n".join(family.preflight(cfg))
    assert "data.train_data" in text and "x.jsonl" in text
    assert "data.text_batch_fraction > 0 needs data.text_data" in text
    assert "data.tokenizer.path is required" in text


@pytest.mark.parametrize("path", sorted(glob.glob("configs/vlm/*.yaml")))
def test_configs_are_in_sync_with_the_schema(path):
    from engine.config import to_yaml

    cfg = _cfg(path)
    with open(path) as fh:
        body = [line for line in fh.read().splitlines() if not line.startswith("#")]
    assert "\n".join(body).strip() == to_yaml(cfg).strip()


def _tiny_clip_checkpoint(out_dir, vision_cfg):
    """A model-only CLIP checkpoint whose tower has the shape of `vision_cfg` (a VLMVisionConfig)."""
    from engine.checkpoint.tools import write_model_checkpoint
    from models.clip.config import CLIPConfig, CLIPExperimentConfig, TextConfig, VisionConfig
    from models.clip.model import CLIPModel

    v = vision_cfg
    vision = VisionConfig(patch_dim=v.patch_dim, img_h=v.img_h, img_w=v.img_w, num_layers=v.num_layers,
                          hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size,
                          num_attention_heads=v.num_attention_heads, output_dim=16)
    text = TextConfig(vocab_size=100, encoder_seq_length=8, num_layers=1, hidden_size=32, ffn_hidden_size=64,
                      num_attention_heads=4, output_dim=16, make_vocab_size_divisible_by=16)
    clip = CLIPModel(CLIPConfig(output_dim=16, vision=vision, text=text))
    return write_model_checkpoint(out_dir, CLIPExperimentConfig(model=clip.cfg), clip.state_dict())


def test_preflight_reads_the_clip_checkpoint_of_model_init_vision(single_rank, tmp_path, monkeypatch):
    """model.init.vision is checked from the checkpoint's meta.json before launch: a missing path
    (a clean clone before the CLIP demo ran) says what to run; an incomplete checkpoint, a non-CLIP
    one and a tower of another shape are named, key by key."""
    family = get_family("vlm")
    tiny = _cfg("configs/vlm/tiny.yaml")
    clip = _tiny_clip_checkpoint(str(tmp_path / "clip"), tiny.model.vision)

    def problems(config, *overrides):
        return "\n".join(p for p in family.preflight(_cfg(config, *overrides)) if "model.init.vision" in p)

    assert problems("configs/vlm/tiny.yaml", f"model.init.vision={clip}") == ""
    text = problems("configs/vlm/tiny_from_clip.yaml", f"model.init.vision={clip}")
    assert "the CLIP tower has another shape than model.vision" in text
    assert "model.vision.patch_dim=16 here, 8 in the checkpoint" in text
    assert "model.vision.hidden_size=128 here, 64 in the checkpoint" in text
    (tmp_path / "empty").mkdir()
    assert "not a complete checkpoint" in problems("configs/vlm/tiny.yaml", f"model.init.vision={tmp_path}/empty")
    # the shipped config in a checkout without the CLIP demo's run: says what to run first
    config = os.path.abspath("configs/vlm/tiny_from_clip.yaml")
    monkeypatch.chdir(tmp_path)
    text = problems(config)
    assert "model.init.vision=runs/clip_tiny/checkpoints: no such file or directory" in text
    assert "examples/pretrain_clip.py --config configs/clip/tiny.yaml" in text
