"""The one swap point between local, flash-attn and Transformer Engine transformer layers.

A model asks for `transformer_layer_spec(backend, causal)` and hands the result to megatron-core's
`TransformerBlock`; nothing else in model code knows which kernels run.
"""
from __future__ import annotations

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from models.common.attention import core_attention_module
from models.common.norm import Norm


def transformer_layer_spec(backend: str = "sdpa", causal: bool = False) -> ModuleSpec:
    """Pre-norm transformer layer: norm -> attention -> residual -> norm -> MLP -> residual."""
    mask_type = AttnMaskType.causal if causal else AttnMaskType.no_mask
    if backend == "te":
        return _te_layer_spec(mask_type)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention_module(backend),
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _te_layer_spec(mask_type: AttnMaskType) -> ModuleSpec:
    """Transformer Engine layers (fused norm+linear, TE attention); GPU only, optional extra."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    spec = get_gpt_layer_with_transformer_engine_spec()
    spec.submodules.self_attention.params["attn_mask_type"] = mask_type
    return spec
