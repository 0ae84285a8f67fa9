"""Shared model blocks (models/common): the TransformerConfig builder's layout errors, the layer
spec's norms and qk-norm, and the local <-> Transformer Engine key map against megatron-core's own."""
import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_block import TransformerBlock

from models.common.spec import local_to_te_key, local_to_te_keys, te_to_local_keys, transformer_layer_spec
from models.common.stage import build_block, padded_vocab_size
from models.common.transformer_config import make_transformer_config

SIZES = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4)


@pytest.mark.parametrize("overrides, message", [
    (dict(tensor_model_parallel_size=3), "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3"),
    (dict(tensor_model_parallel_size=4, num_query_groups=2),
     "num_query_groups=2 .* not divisible by tensor_model_parallel_size=4"),
    (dict(num_query_groups=3), "num_attention_heads=4 is not divisible by num_query_groups=3"),
    (dict(tensor_model_parallel_size=2, ffn_hidden_size=63), "ffn_hidden_size=63 is not divisible"),
    (dict(pipeline_model_parallel_size=4, num_layers=6), "num_layers=6 is not divisible by pipeline_model_parallel_size=4"),
    (dict(activation="tanh"), "activation='tanh'"),
    (dict(normalization="BatchNorm"), "normalization='BatchNorm'"),
])
def test_layout_errors_name_the_key(overrides, message):
    # Checked from the arguments alone, before megatron-core sees them and with no process group.
    kwargs = {**SIZES, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, **overrides}
    with pytest.raises(ValueError, match=message):
        make_transformer_config(**kwargs)


def test_config_must_match_running_layout(single_rank):
    with pytest.raises(ValueError, match="running parallel state is TP=1, PP=1"):
        make_transformer_config(**SIZES, tensor_model_parallel_size=2, pipeline_model_parallel_size=1)


def test_swiglu_turns_on_the_gated_unit():
    config = make_transformer_config(**SIZES, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                     activation="swiglu", add_bias_linear=False, normalization="RMSNorm")
    assert config.gated_linear_unit and config.activation_func is torch.nn.functional.silu
    assert not config.add_bias_linear and config.normalization == "RMSNorm"


def test_llama_layer_has_rmsnorm_gqa_swiglu_and_no_biases(single_rank):
    config = make_transformer_config(**SIZES, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                     num_query_groups=2, activation="swiglu", add_bias_linear=False,
                                     normalization="RMSNorm", qk_layernorm=True)
    block = build_block(config, transformer_layer_spec("sdpa", causal=True, normalization="RMSNorm",
                                                       qk_layernorm=True))
    assert isinstance(block, TransformerBlock)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items() if torch.is_tensor(v)}
    head = 32 // 4
    assert shapes["layers.0.self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * head, 32)  # q heads + k, v groups
    assert shapes["layers.0.mlp.linear_fc1.weight"] == (2 * 64, 32)  # [gate; up]
    assert shapes["layers.0.self_attention.q_layernorm.weight"] == (head,)
    assert not any(k.endswith(".bias") for k in shapes)  # RMSNorm and no linear biases
    assert isinstance(block.layers[0].input_layernorm, torch.nn.RMSNorm)
    assert isinstance(block.final_layernorm, torch.nn.RMSNorm)
    # qk-norm gains see only this TP rank's heads: summed over TP after backward.
    assert block.layers[0].self_attention.q_layernorm.weight.grad_summed_over_tp


def test_spec_norm_must_agree_with_config(single_rank):
    config = make_transformer_config(**SIZES, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    with pytest.raises(ValueError, match="spec asks for RMSNorm but TransformerConfig.normalization='LayerNorm'"):
        build_block(config, transformer_layer_spec("sdpa", normalization="RMSNorm"))


def test_local_to_te_key_map_is_megatrons():
    megatron_map = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    for local, te in megatron_map.items():
        assert local_to_te_key(f"decoder.layers.7.{local}weight") == f"decoder.layers.7.{te}weight"
    state = {"decoder.layers.0.input_layernorm.weight": 1, "decoder.layers.0.pre_mlp_layernorm.bias": 2,
             "decoder.layers.0.mlp.linear_fc1.weight": 3, "decoder.final_layernorm.weight": 4,
             "embedding.word_embeddings.weight": 5}
    te = local_to_te_keys(state)
    assert te == {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": 1,
                  "decoder.layers.0.mlp.linear_fc1.layer_norm_bias": 2, "decoder.layers.0.mlp.linear_fc1.weight": 3,
                  "decoder.final_layernorm.weight": 4, "embedding.word_embeddings.weight": 5}
    assert te_to_local_keys(te) == state


def test_padded_vocab_size():
    assert padded_vocab_size(128256, 128, tensor_model_parallel_size=1) == 128256
    assert padded_vocab_size(32000, 128, tensor_model_parallel_size=3) == 32256
    assert padded_vocab_size(50257, 128, tensor_model_parallel_size=2) == 50432


def test_strided_tp_shards_hold_their_slice_of_gate_and_up():
    from parallel.tp_sharding import shard_tensor, unshard_tensors

    gate, up = torch.arange(8.0).reshape(8, 1), 100 + torch.arange(8.0).reshape(8, 1)
    full = torch.cat([gate, up])  # megatron's TP=1 fc1 of a gated MLP: [gate; up]
    shards = [shard_tensor(full, 0, 2, rank, 2) for rank in range(2)]
    torch.testing.assert_close(shards[1], torch.cat([gate[4:], up[4:]]))
    torch.testing.assert_close(unshard_tensors(shards, 0, 2), full)
    torch.testing.assert_close(unshard_tensors([shard_tensor(full, 0, 1, r, 4) for r in range(4)], 0, 1), full)
