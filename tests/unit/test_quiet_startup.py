"""Building models warns about nothing a user cannot act on (megatron's deprecated default
cuda_graph_scope warned once per TransformerConfig, on every rank)."""
import warnings

from models.common.transformer_config import make_transformer_config


def test_transformer_config_builds_without_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_transformer_config(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                                tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    assert [str(w.message) for w in caught] == []
