"""A Llama-architecture decoder on megatron-core blocks: one pipeline stage of it per rank.

    tokens -> embedding.word_embeddings (vocab-parallel) -> decoder (megatron TransformerBlock:
    RMSNorm, GQA self-attention with RoPE, SwiGLU MLP; final RMSNorm on the last stage) ->
    output_layer (column-parallel over the vocabulary, or the tied embedding) -> logits / loss

Own composition of megatron-core's pieces rather than its `GPTModel`, with the same state-dict keys
as `GPTModel` built from the local spec (embedding.word_embeddings.weight, decoder.layers.<i>.*,
decoder.final_layernorm.weight, output_layer.weight), so Megatron-LM / NeMo (mcore) checkpoints
map one to one. Why not `GPTModel` itself: on CPU its `RotaryEmbedding` moves its frequencies to
`torch.cuda.current_device()` and its tied-embedding set-up calls `.cuda()`; its Llama-3 scaling
fixes low/high factors and the original context (8192); its RoPE takes no per-row positions (left-
padded generation); and its KV cache is megatron's inference context with CUDA-only kernels. Here
the embedding, rotary angles, block, output layer and loss are megatron's where they run on CPU
(VocabParallelEmbedding, TransformerBlock, ColumnParallelLinear, vocab_parallel_cross_entropy,
apply_rotary_pos_emb inside SelfAttention) and ours where they do not (models/common/rotary.py,
models/common/kv_cache.py).

Attention is causal over the whole packed sequence: documents separated by the end-of-document
token attend across the boundary, as Megatron's GPT dataset does by default
(`reset_attention_mask=False`) and as Llama was pretrained; the EOD token tells the model a new
document starts.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
)
from megatron.core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
)

from models.common.attention import resolve_attention_backend
from models.common.recompute import recompute_settings
from models.common.rotary import RotaryEmbedding
from models.common.sequence_parallel import SequenceParallelRegion
from models.common.spec import transformer_layer_spec
from models.common.stage import build_block, padded_vocab_size, pipeline_stage_flags
from models.common.transformer_config import make_transformer_config, parallel_sizes
from models.llm.config import LLMConfig, validate_llm_config
from models.llm.loss import masked_mean_loss


def llm_transformer_config(cfg: LLMConfig, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                           **overrides):
    """The megatron `TransformerConfig` of an `LLMConfig` section."""
    overrides = {**recompute_settings(cfg), **overrides}
    return make_transformer_config(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels, tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size, normalization=cfg.normalization,
        activation=cfg.activation, add_bias_linear=cfg.add_bias_linear, add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm, hidden_dropout=cfg.hidden_dropout, attention_dropout=cfg.attention_dropout,
        layernorm_epsilon=cfg.layernorm_epsilon, init_method_std=cfg.init_method_std, **overrides,
    )


class LLMEmbedding(torch.nn.Module):
    """Vocab-parallel token embedding + dropout; the sequence-parallel scatter happens in the model."""

    def __init__(self, config, padded_vocab: int):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(padded_vocab, config.hidden_size,
                                                      init_method=config.embedding_init_method, config=config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[b, s] ids -> [b, s, h] (replicated over TP)."""
        return self.word_embeddings(tokens)


class LLMModel(torch.nn.Module):
    """This rank's pipeline stage of the decoder (see `stage_forward`).

    `tensor_model_parallel_size` / `pipeline_model_parallel_size` default to the running parallel
    state's; `transformer_overrides` go to the TransformerConfig (params_dtype, bf16/fp16,
    use_cpu_initialization, perform_initialization, sequence_parallel, recompute...).
    """

    def __init__(self, cfg: LLMConfig, pre_process: bool | None = None, post_process: bool | None = None,
                 tensor_model_parallel_size: int | None = None, pipeline_model_parallel_size: int | None = None,
                 **transformer_overrides):
        super().__init__()
        validate_llm_config(cfg)
        running_tp, running_pp = parallel_sizes()
        tp = tensor_model_parallel_size or running_tp
        pp = pipeline_model_parallel_size or running_pp
        self.cfg = cfg
        self.pre_process, self.post_process = pipeline_stage_flags(pre_process, post_process)
        if cfg.share_embeddings_and_output_weights and pp > 1:
            raise ValueError(
                "model.share_embeddings_and_output_weights=true with pipeline_model_parallel_size="
                f"{pp}: the first and last stages would each hold a copy of the embedding whose gradients "
                "must be summed every step, which this engine does not do; untie the weights "
                "(model.share_embeddings_and_output_weights=false: import copies the embedding into "
                "output_layer.weight) or use pipeline_model_parallel_size=1")
        self.config = llm_transformer_config(cfg, tp, pp, **transformer_overrides)
        self.attention_backend = resolve_attention_backend(cfg.attention_backend, cfg.use_flash_attention)
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
        self.sequence_parallel = SequenceParallelRegion(self.config)
        if self.pre_process:
            self.embedding = LLMEmbedding(self.config, self.padded_vocab_size)
        scaling = None
        if cfg.rope_scaling.type == "llama3":
            rs = cfg.rope_scaling
            scaling = {"factor": rs.factor, "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
                       "original_max_position_embeddings": rs.original_max_position_embeddings}
        self.rotary_pos_emb = RotaryEmbedding(self.config.kv_channels, cfg.rotary_base, cfg.rotary_percent,
                                              self.config.rotary_interleaved, scaling)
        spec = transformer_layer_spec(self.attention_backend, causal=True, normalization=cfg.normalization,
                                      qk_layernorm=cfg.qk_layernorm)
        self.decoder = build_block(self.config, spec, post_process=self.post_process)
        if self.post_process:
            tied_here = self.pre_process and cfg.share_embeddings_and_output_weights
            self.output_layer = ColumnParallelLinear(
                self.config.hidden_size, self.padded_vocab_size, config=self.config,
                init_method=self.config.init_method, bias=False, gather_output=False,
                skip_weight_param_allocation=tied_here)
            if self.output_layer.weight is not None:
                # Its rows are the padded vocabulary, whose padding depends on TP: checkpoints save
                # and reload it like the embedding (engine.checkpoint.layout.VOCAB_PADDED_ATTR).
                self.output_layer.weight.vocab_padded = True

    # -- pieces ----------------------------------------------------------------------------------
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[b, s] ids -> [b, s, h] input embeddings (first stage). A VLM splices image features into
        these and passes the result as `inputs_embeds`."""
        return self.embedding(tokens)

    def output_weight(self) -> torch.Tensor:
        if self.cfg.share_embeddings_and_output_weights:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight

    def _decoder_input(self, tokens, inputs_embeds) -> torch.Tensor:
        x = self.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds
        x = x.to(self.config.params_dtype).transpose(0, 1).contiguous()  # megatron layout [s, b, h]
        if self.sequence_parallel.enabled:
            x = self.sequence_parallel.scatter(x)
            # Each TP rank holds its own slice of the sequence: its own dropout mask (megatron's).
            with get_cuda_rng_tracker().fork():
                return torch.nn.functional.dropout(x, self.config.hidden_dropout, self.training)
        return torch.nn.functional.dropout(x, self.config.hidden_dropout, self.training)

    def vocab_parallel_logits(self, hidden: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        """Final hidden [s(/TP under SP), b, h] -> this TP rank's logits [s, b, V_pad / TP] (the
        output layer all-gathers a sequence-parallel input); `seq_len` drops the SP padding."""
        weight = self.output_weight() if self.cfg.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)
        return logits if seq_len is None else logits[:seq_len]

    def gather_logits(self, vocab_parallel_logits: torch.Tensor) -> torch.Tensor:
        """[s, b, V_pad / TP] -> full [b, s, vocab_size] on every TP rank (padding columns dropped)."""
        full = gather_from_tensor_model_parallel_region(vocab_parallel_logits)
        return full[..., : self.cfg.vocab_size].transpose(0, 1)

    # -- one pipeline stage ----------------------------------------------------------------------
    def stage_forward(self, inputs: dict | None = None, tokens: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None, *,
                      inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, last_position_only: bool = False) -> dict:
        """Run this stage.

        First stage: `tokens` [b, s] (or `inputs_embeds` [b, s, h]). Later stages: `inputs`, the
        previous stage's {"hidden": [s, b, h]} ([s / TP, b, h] under sequence parallelism).
        Not the last stage: returns {"hidden": ...} for the next one. Last stage: with `labels`
        [b, s] (the next tokens), {"loss": masked mean cross entropy (fp32 scalar)}; without,
        {"logits": [b, s, vocab_size]} gathered over TP.
        `position_ids` [s] or [b, s] (default 0..s-1) and `attention_mask` (megatron's boolean mask,
        True = masked, [b, 1, s_q, s_k]; default causal) are for generation; every stage must be
        given the same ones. `last_position_only`: logits of the last position only ([b, 1, V];
        generation, without sequence parallelism).
        """
        if self.pre_process:
            if (tokens is None) == (inputs_embeds is None):
                raise ValueError("the first pipeline stage takes tokens or inputs_embeds (one of them)")
            seq_len = (tokens if tokens is not None else inputs_embeds).shape[1]
            if seq_len > self.cfg.max_position_embeddings:
                raise ValueError(f"sequence of {seq_len} tokens exceeds model.max_position_embeddings="
                                 f"{self.cfg.max_position_embeddings}")
            hidden = self._decoder_input(tokens, inputs_embeds)
        else:
            if not inputs or "hidden" not in inputs:
                raise ValueError("a later pipeline stage needs the previous stage's {'hidden': ...}")
            hidden = inputs["hidden"]
            seq_len = next((t.shape[-1] for t in (labels, position_ids) if t is not None), None)
        # Attention runs over the whole (under SP: padded to a multiple of TP) sequence; padding
        # comes last, so causal attention keeps it away from the real tokens.
        attn_len = hidden.shape[0] * (self.sequence_parallel.tp if self.sequence_parallel.enabled else 1)
        if position_ids is None:
            position_ids = torch.arange(attn_len, device=hidden.device)
        elif position_ids.shape[-1] < attn_len:
            extra = torch.arange(1, attn_len - position_ids.shape[-1] + 1, device=position_ids.device)
            position_ids = torch.cat([position_ids, position_ids[..., -1:] + extra.expand(*position_ids.shape[:-1], -1)],
                                     dim=-1)
        rotary = self.rotary_pos_emb(position_ids)
        hidden = self.decoder(hidden, attention_mask=attention_mask, rotary_pos_emb=rotary)
        if not self.post_process:
            return {"hidden": hidden}
        if last_position_only:
            if self.sequence_parallel.enabled:
                raise ValueError("last_position_only needs sequence_parallel=false")
            return {"logits": self.gather_logits(self.vocab_parallel_logits(hidden[-1:]))}
        logits = self.vocab_parallel_logits(hidden, seq_len)
        if labels is None:
            return {"logits": self.gather_logits(logits)}
        return {"loss": masked_mean_loss(logits, labels, loss_mask, self.cfg.vocab_size)}

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The whole model (one pipeline stage): logits [b, s, vocab_size], or the loss with labels."""
        if not (self.pre_process and self.post_process):
            raise RuntimeError("LLMModel.forward runs the whole model; under pipeline parallelism use "
                               "engine.schedules with models.llm.model.llm_forward_step")
        out = self.stage_forward(tokens=tokens, labels=labels, loss_mask=loss_mask)
        return out["loss"] if labels is not None else out["logits"]

    # -- optimizer hook --------------------------------------------------------------------------
    @staticmethod
    def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
        """Megatron's rule: no decay for biases and norm gains (every tensor of fewer than 2 dims);
        embeddings and the output layer are decayed (Megatron, nanoGPT)."""
        return param.ndim < 2


def llm_forward_step(model: LLMModel, batch: dict | None, inputs: dict | None):
    """One micro-batch through this pipeline stage, for `engine.schedules.forward_backward`.

    `batch` {"tokens", "labels", "loss_mask"} (each [b, s]) is read on the first stage (tokens) and
    on the last (labels, loss_mask): run the schedule with `reads_data=True` on both and give them
    loaders built with the same arguments (they yield the same batches). Returns (the loss on the
    last stage | the message for the next stage, {"samples", "tokens"}); tokens counts every
    position of the micro-batch (Megatron's tokens/s), masked or not.
    """
    device = next(model.parameters()).device
    info = {"samples": 0, "tokens": 0}
    tokens = labels = loss_mask = None
    if batch is not None:
        rows, seq = batch["tokens"].shape
        mask = batch.get("loss_mask")
        info = {"samples": rows, "tokens": rows * seq}
        if model.pre_process:
            tokens = batch["tokens"].to(device, non_blocking=True)
        if model.post_process:
            labels = batch["labels"].to(device, non_blocking=True)
            loss_mask = mask.to(device, non_blocking=True) if mask is not None else None
    elif model.pre_process or model.post_process:
        raise RuntimeError("the first and last pipeline stages of the LLM read the batch (reads_data=True)")
    out = model.stage_forward(inputs, tokens, labels, loss_mask)
    return (out["loss"], info) if model.post_process else (out, info)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
