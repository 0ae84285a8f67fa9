"""LoRA on megatron linears and the CLIP fine-tuning scenarios, one process (TP=1).

B = 0 leaves the model's output bit-identical; the merged weights reproduce the adapted forward
within 1e-5 (fp32); query/value adapters change only megatron's own query/value split of the fused
QKV (checked through `get_query_key_value_tensors`, not our layout code).
"""
import pytest
import torch

from models.clip.finetune import FinetuneConfig, configure_finetune
from models.common.lora import (
    LoRAConfig,
    apply_lora,
    count_parameters,
    is_lora_key,
    load_base_state_dict,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora_,
    merged_state_dict,
    remove_lora_,
    resolve_targets,
    unmerge_lora_,
)
from tests.distributed.clip_fixtures import tiny_batch, tiny_clip_config

TOL = 1e-5
ALL_TARGETS = ["q_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _model(seed=0):
    from models.clip.model import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config())
    model.eval()
    return model


def _randomise_b(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def test_zero_b_leaves_output_unchanged(single_rank):
    model = _model()
    images, tokens = tiny_batch(3, seed=2, cfg=model.cfg)
    before = model(images, tokens)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=ALL_TARGETS))
    after = model(images, tokens)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_merged_export_equals_unmerged_forward(single_rank):
    model = _model()
    images, tokens = tiny_batch(3, seed=2, cfg=model.cfg)
    base = model(images, tokens)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1, target_modules=ALL_TARGETS))
    _randomise_b(model)
    adapted = model(images, tokens)
    assert (adapted[0] - base[0]).abs().max() > 1e-3  # the adapters do something
    model.train()
    assert not torch.equal(model(images, tokens)[0], adapted[0])  # dropout on the adapter input in training
    model.eval()
    plain = _model(seed=5)
    plain.load_state_dict(merged_state_dict(model))
    for got, want in zip(plain(images, tokens), adapted):
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_lora_(model)
    for got, want in zip(model(images, tokens), adapted):  # merged weights, adapters skipped
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    unmerge_lora_(model)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=0)
    remove_lora_(model)
    assert not any(is_lora_key(k) for k in model.state_dict())
    for got, want in zip(model(images, tokens), adapted):
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_value_adapter_touches_only_megatron_value_heads(single_rank):
    model = _model()
    attention = model.visual.transformer.layers[0].self_attention
    hidden = torch.randn(5, 2, model.cfg.vision.hidden_size)
    q0, k0, v0 = (t.detach() for t in attention.get_query_key_value_tensors(hidden)[:3])
    apply_lora(model, LoRAConfig(rank=4, dropout=0.0, target_modules=["v_proj"]), include=["visual."])
    _randomise_b(model)
    q1, k1, v1 = attention.get_query_key_value_tensors(hidden)[:3]
    assert torch.equal(q1, q0) and torch.equal(k1, k0)
    assert (v1 - v0).abs().min() > 0  # every value head of every group moves
    apply_lora(model.text, LoRAConfig(rank=4, dropout=0.0, target_modules=["q_proj"]))
    _randomise_b(model.text, seed=3)
    attention = model.text.transformer.layers[1].self_attention
    hidden = torch.randn(5, 2, model.cfg.text.hidden_size)
    before = attention.get_query_key_value_tensors(hidden)[:3]
    with torch.no_grad():
        attention.linear_qkv.lora["query"].lora_B.zero_()
    after = attention.get_query_key_value_tensors(hidden)[:3]
    assert not torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) and torch.equal(before[2], after[2])


def test_adapter_state_and_base_loading(single_rank):
    model = _model()
    base_state = {k: v.clone() if v is not None else v for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=2, target_modules=["query", "value"]))
    keys = sorted(lora_state_dict(model))
    assert keys[0] == "text.transformer.layers.0.self_attention.linear_qkv.lora.query.lora_A"
    assert len(keys) == 2 * 2 * 2 * 2  # towers x layers x (query, value) x (A, B)
    # The base weights keep their names: a checkpoint of the plain model loads as is.
    assert "visual.transformer.layers.0.self_attention.linear_qkv.weight" in model.state_dict()
    load_base_state_dict(model, base_state)
    with pytest.raises(KeyError, match="missing"):
        load_base_state_dict(model, {k: v for k, v in base_state.items() if "conv1" not in k})
    _randomise_b(model)
    saved = lora_state_dict(model)
    other = _model()
    apply_lora(other, LoRAConfig(rank=2, target_modules=["query", "value"]))
    load_lora_state_dict(other, saved)
    assert all(torch.equal(lora_state_dict(other)[k], v) for k, v in saved.items())
    with pytest.raises(KeyError, match="do not match"):
        load_lora_state_dict(other, {})


def test_targets():
    assert resolve_targets(["q_proj", "v_proj", "c_fc", "linear_proj"]) == ["query", "value", "fc1", "proj"]
    with pytest.raises(ValueError, match="did you mean 'q_proj'"):
        resolve_targets(["q_prj"])
    with pytest.raises(ValueError, match="overlaps"):
        resolve_targets(["qkv", "query"])


@pytest.mark.parametrize("scenario", ["zero_shot", "linear_probe", "lora_dual", "lora_vision", "lora_text", "full"])
def test_scenarios_train_what_they_say(single_rank, scenario):
    model = _model()
    summary = configure_finetune(model, FinetuneConfig(scenario=scenario, lora=LoRAConfig(rank=4)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    projections = {"visual.proj.weight", "text.text_projection.weight"}
    lora_v = {n for n in trainable if n.startswith("visual.") and is_lora_key(n)}
    lora_t = {n for n in trainable if n.startswith("text.") and is_lora_key(n)}
    expect = {
        "zero_shot": set(),
        "linear_probe": projections,
        "lora_dual": projections | lora_v | lora_t,
        "lora_vision": {"visual.proj.weight"} | lora_v,
        "lora_text": {"text.text_projection.weight"} | lora_t,
        "full": {n for n, _ in model.named_parameters()},
    }[scenario]
    assert trainable == expect
    if scenario.startswith("lora_"):
        assert lora_v if scenario != "lora_text" else not lora_v
        assert lora_t if scenario != "lora_vision" else not lora_t
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert f"{summary.trainable:,} of {summary.total:,} parameters train" in summary.line()
    assert ("logit_scale" in trainable) == (scenario == "full")


def test_count_parameters_scales_tp_shards(single_rank):
    layer = torch.nn.Linear(4, 4)
    layer.weight.tensor_model_parallel = True
    layer.bias.requires_grad_(False)
    assert count_parameters(layer, tp_size=2) == (32, 36)


def test_transformer_engine_linears_are_refused():
    class TELayerNormColumnParallelLinear(torch.nn.Linear):  # stands in for TE's fused norm + linear
        pass

    with pytest.raises(NotImplementedError, match="Transformer Engine"):
        apply_lora(torch.nn.Sequential(TELayerNormColumnParallelLinear(4, 4)), LoRAConfig())
    with pytest.raises(ValueError, match="matched no tensor-parallel linear"):
        apply_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoRAConfig())
