"""Checkpoint conversion between this project's models and open_clip / Hugging Face formats.

Every converter goes through the *full* (TP=1, PP=1) state dict of the family's model
(`models.clip.model.CLIPModel`, `models.llm.model.LLMModel`):
import builds it from the foreign format, export reads it (gather a TP-sharded model first with
`parallel.tp_sharding.gather_full_state_dict`, and cut one for a TP rank with
`parallel.tp_sharding.shard_full_state_dict`). Nothing here touches process groups.

- `conversion.clip_layout`: our state dict's names and shapes, megatron's fused-QKV layout, the
  errors raised for a mismatched architecture or an unreadable file.
- `conversion.openclip_format`: open_clip `CLIP` state dicts and model configs.
- `conversion.hf_clip_format`: Hugging Face `CLIPModel` directories (config.json + safetensors).
- `conversion.llm_layout`: the LLM's state dict names and shapes, megatron's fused QKV for grouped-
  query attention, the fused SwiGLU gate/up projection.
- `conversion.hf_llama`: Hugging Face `LlamaForCausalLM` directories (sharded or not).
- `conversion.hf_dir`: reading and writing Hugging Face model directories (config.json, safetensors
  shards and their index).
"""
from conversion.clip_layout import CheckpointFileError, CheckpointMismatchError, UnsupportedArchitectureError

__all__ = ["CheckpointFileError", "CheckpointMismatchError", "UnsupportedArchitectureError"]
