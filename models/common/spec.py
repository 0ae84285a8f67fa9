"""The one swap point between local, flash-attn and Transformer Engine transformer layers.

`transformer_layer_spec` mirrors megatron-core's `get_gpt_layer_local_spec` (models/gpt/
gpt_layer_specs.py): the spec picks modules (which norm, which attention kernel, whether queries and
keys get a per-head norm); what the modules compute from the config is the `TransformerConfig`'s
business, as in megatron-core: a plain or gated (SwiGLU) MLP (`gated_linear_unit`), biases on or
off (`add_bias_linear`, `add_qkv_bias`), grouped-query attention (`num_query_groups`), the head
size (`kv_channels`). Rotary embeddings are applied inside megatron's `SelfAttention` from the
`rotary_pos_emb` the model passes to the block (models/common/rotary.py). Build the config with
`models.common.transformer_config.make_transformer_config` and the same `normalization` and
`qk_layernorm`.

Local and Transformer Engine layers name two parameters differently: TE fuses the layer's input
norm into the QKV linear and the pre-MLP norm into fc1. `local_to_te_keys` / `te_to_local_keys`
rename state-dict keys between the two (megatron-core's own `sharded_state_dict_keys_map` of the
local spec says the same). Both sides also carry `_extra_state` entries (None for local layers,
fp8 metadata for TE ones; TE's core attention has one the local layers lack): a loader treats them
as optional (`is_extra_state`).
"""
from __future__ import annotations

import re

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from models.common.attention import core_attention_module
from models.common.norm import Norm, QKNorm, norm_class

# Local layer key part -> Transformer Engine key part (inside `...layers.<i>.`).
LOCAL_TO_TE_KEY_PARTS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def transformer_layer_spec(backend: str = "sdpa", causal: bool = False, *, normalization: str | None = None,
                           qk_layernorm: bool = False, qk_l2_norm: bool = False) -> ModuleSpec:
    """Pre-norm transformer layer: norm -> attention -> residual -> norm -> MLP -> residual.

    backend: sdpa | flash (local megatron layers with that core attention) | te (Transformer
    Engine layers, GPU only). causal: the attention mask type (causal or none; a model may still
    pass an explicit mask, which the sdpa kernel honours). normalization: LayerNorm | RMSNorm
    (None: whatever `TransformerConfig.normalization` says, which CLIP relies on). qk_layernorm:
    a norm of that kind over each query and key head; qk_l2_norm: an L2 normalisation instead.
    """
    mask_type = AttnMaskType.causal if causal else AttnMaskType.no_mask
    if qk_layernorm and qk_l2_norm:
        raise ValueError("qk_layernorm and qk_l2_norm exclude each other")
    if backend == "te":
        return _te_layer_spec(mask_type, qk_layernorm, qk_l2_norm)
    norm = Norm if normalization is None else norm_class(normalization)
    qk_norm = IdentityOp
    if qk_l2_norm:
        from megatron.core.transformer.torch_norm import L2Norm

        qk_norm = L2Norm
    elif qk_layernorm:
        qk_norm = QKNorm
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention_module(backend),
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _te_layer_spec(mask_type: AttnMaskType, qk_layernorm: bool, qk_l2_norm: bool) -> ModuleSpec:
    """Transformer Engine layers (fused norm+linear, TE attention); GPU only, optional extra. TE's
    norms follow `TransformerConfig.normalization`."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm, qk_l2_norm=qk_l2_norm)
    spec.submodules.self_attention.params["attn_mask_type"] = mask_type
    return spec


_LAYER_PREFIX = re.compile(r"^(.*?\blayers\.\d+\.)?(.*)$")


def _rename(name: str, table: dict) -> str:
    prefix, rest = _LAYER_PREFIX.match(name).groups()
    for old, new in table.items():
        if rest.startswith(old):
            return (prefix or "") + new + rest[len(old):]
    return name


def local_to_te_key(name: str) -> str:
    """`decoder.layers.3.input_layernorm.weight` -> `decoder.layers.3.self_attention.linear_qkv.layer_norm_weight`."""
    return _rename(name, LOCAL_TO_TE_KEY_PARTS)


def te_to_local_key(name: str) -> str:
    return _rename(name, {v: k for k, v in LOCAL_TO_TE_KEY_PARTS.items()})


def local_to_te_keys(state: dict) -> dict:
    """A state dict of local-spec layers under Transformer Engine names (values untouched)."""
    return {local_to_te_key(k): v for k, v in state.items()}


def te_to_local_keys(state: dict) -> dict:
    return {te_to_local_key(k): v for k, v in state.items()}


def is_extra_state(name: str) -> bool:
    """megatron/TE `_extra_state` entries: optional when loading across backends."""
    return name.endswith("._extra_state") or name == "_extra_state"
