"""The VLM's configuration: a vision tower (this project's CLIP ViT), a connector (LLaVA's MLP or a
perceiver resampler) and the Llama-style LLM, with the seed's `BeniConfig` / `VisionTowerConfig` /
`PerceiverResamplerConfig` keys where they exist, plus its data (conversations, templates, modality
mixing) and evaluation sections. `configs/vlm/*.yaml` mirror `VLMExperimentConfig` 1:1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from engine.config_checks import at_least, greater_than, one_of, probability
from engine.schema import ExperimentConfig, OptimConfig, TrainerConfig
from models.common.lora import LoRAConfig
from models.llm.config import LLMConfig


@dataclass
class VLMVisionConfig:
    """The ViT image tower: the fields of a CLIP `model.vision` section (a CLIP checkpoint's must
    match them), plus which features the VLM takes."""

    patch_dim: int = 16
    img_h: int = 224
    img_w: int = 224
    num_channels: int = 3
    image_mean: list | None = None  # None -> the CLIP mean
    image_std: list | None = None
    class_token_length: int = 1
    num_layers: int = 12  # the CLIP tower's layers (the VLM builds those up to feature_select_index)
    hidden_size: int = 768
    ffn_hidden_size: int = 3072
    num_attention_heads: int = 12
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"  # gelu (open_clip), quick_gelu (OpenAI weights)
    # The output of which layer feeds the connector, as Hugging Face's hidden_states[k] (LLaVA's
    # mm_vision_select_layer): -1 the last layer, -2 the one before (LLaVA-1.5), k > 0 layer k.
    # Layers after it are not built; the final norm and projection of CLIP are never used.
    feature_select_index: int = -2
    use_cls: bool = False  # keep the class token(s) (LLaVA drops them: mm_vision_select_feature=patch)
    activations_checkpoint_granularity: str | None = None
    activations_checkpoint_method: str | None = None
    activations_checkpoint_num_layers: int | None = None

    @property
    def num_patches(self) -> int:
        return (self.img_h // self.patch_dim) * (self.img_w // self.patch_dim)

    @property
    def seq_length(self) -> int:
        return self.num_patches + self.class_token_length

    @property
    def layers_used(self) -> int:
        k = self.feature_select_index
        return k if k > 0 else self.num_layers + 1 + k

    @property
    def num_features(self) -> int:
        """Feature vectors per image that reach the connector."""
        return self.num_patches + (self.class_token_length if self.use_cls else 0)


@dataclass
class PerceiverResamplerConfig:
    """The seed's `PerceiverResamplerConfig` (Idefics2's resampler): `n_latents` learned queries
    attend to the image features (and to themselves with `concat_latents_kv`) in `depth` layers."""

    hidden_size: int | None = None  # the resampler's width; None: the vision tower's hidden_size
    depth: int = 1
    n_latents: int = 64
    n_heads: int = 16
    head_dim: int = 96
    n_query_groups: int = 1  # key/value heads (grouped-query attention)
    concat_latents_kv: bool = True  # keys/values from [image features; latents] (Idefics2) or the features only
    attention_dropout: float = 0.0
    ffn_hidden_size: int | None = None  # None: 4 x hidden_size
    layernorm_epsilon: float = 1e-5


@dataclass
class ConnectorConfig:
    type: str = "mlp"  # mlp (LLaVA's mlp<depth>x_gelu) | perceiver
    mlp_depth: int = 2  # linear layers of the MLP (LLaVA-1.5: 2, "mlp2x_gelu"; 1: a linear projection)
    perceiver: PerceiverResamplerConfig = field(default_factory=PerceiverResamplerConfig)


@dataclass
class FreezeConfig:
    """Which parts train (Megatron-LM's --freeze-ViT / --freeze-LM; LLaVA's stages). Frozen parts
    hold no optimizer state and no gradient buffers. With `model.lora.enabled` the LLM's base weights
    are frozen whatever `llm` says; its adapters train."""

    vision: bool = True
    connector: bool = False
    llm: bool = False


@dataclass
class VLMLoRAConfig(LoRAConfig):
    """LoRA on the LLM's tensor-parallel linears (models/common/lora.py); the vision tower and the
    connector never get adapters."""

    enabled: bool = False


@dataclass
class InitConfig:
    """Pretrained parts, loaded at step 0 when there is nothing to resume (the connector starts
    fresh). `checkpoint.init_from` (a whole VLM checkpoint) loads after these and wins."""

    # An engine CLIP checkpoint (or checkpoint root): its `visual.*` tower up to feature_select_index.
    vision: str | None = None
    # An engine LLM checkpoint (or root) or a Hugging Face LlamaForCausalLM directory.
    llm: str | None = None


@dataclass
class VLMConfig:
    megatron_amp_O2: bool = False  # with bf16/fp16: low-precision params, fp32 master weights and grads
    attention_backend: str = "sdpa"  # sdpa | flash | te, for the vision tower and the LLM
    use_flash_attention: bool = False
    vision: VLMVisionConfig = field(default_factory=VLMVisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: VLMLoRAConfig = field(default_factory=VLMLoRAConfig)
    init: InitConfig = field(default_factory=InitConfig)

    @property
    def image_tokens(self) -> int:
        """LLM positions one image fills."""
        if self.connector.type == "perceiver":
            return self.connector.perceiver.n_latents
        return self.vision.num_features


@dataclass
class TemplateConfig:
    """The seed's prompt template (BeniConfig): each turn is `instruction_template` (no loss) then
    `response_template` (loss, its end-of-turn token included). `bos_token` starts the sequence
    (empty: none); the images of a sample whose text has no `image_token` go right after it (the
    seed's offset for the image insert)."""

    bos_token: str = "<s>"
    instruction_template: str = "<|user|> {instruction} <|end|> <|assistant|>"
    response_template: str = "{response} <|end|>"
    image_token: str = "<image>"  # marks where an image goes in an instruction (never tokenized)
    system_prompt: str = ""  # text before the first turn (no loss); empty: none
    stop_token: str | None = "<|end|>"  # where generation stops (null: the tokenizer's eos)


@dataclass
class VLMTokenizerConfig:
    type: str = "huggingface"  # huggingface (a tokenizer.json or its directory) | sentencepiece (a .model)
    path: str | None = None  # None: the synthetic set's word-level tokenizer.json
    # huggingface: special-token names; None reads tokenizer_config.json beside the file, then common
    # names. eos ends generation when data.template.stop_token is null; the template has its own bos.
    bos_token: str | None = None
    eos_token: str | None = None


@dataclass
class SyntheticVQAConfig:
    """The synthetic visual question-answering set used when `data.train_data` is empty
    (data/vlm_synthetic.py): 1-3 shapes of one colour and kind; colour, shape, count, position and
    size questions with one-word answers, or a caption per image (`data.use_captions`). Samples
    are built on the fly from (seed, split, index); only the tokenizer is written to `out_dir`."""

    out_dir: str = "data_cache/vqa"
    num_train: int = 20000
    num_eval: int = 500
    image_size: int = 64
    max_turns: int = 2  # questions per image (a multi-turn conversation)
    seed: int = 0


@dataclass
class VLMDataConfig:
    # Conversations: jsonl files, one record per line: LLaVA's {"image": path | [paths],
    # "conversations": [{"from": "human" | "gpt", "value"}]} or {"messages": [{"role", "content"}]}.
    # Or WebDataset tar shards: <key>.json (the record without "image") + <key>.jpg (<key>.<n>.jpg for
    # several). A file, glob, directory or comma list. None: the synthetic VQA set.
    train_data: str | None = None
    text_data: str | None = None  # text-only conversations, mixed in by text_batch_fraction
    eval_data: str | None = None
    image_folder: str | None = None  # where jsonl image paths are relative to (None: the jsonl's folder)
    # Caption pretraining (LLaVA stage 1) on the synthetic set: one turn "describe the image" -> caption.
    use_captions: bool = False
    # Share of micro-batches that are text-only, the same micro-batches on every data-parallel rank
    # (the seed's MultiLoader: no rank runs the vision path while another does not).
    text_batch_fraction: float = 0.0
    group_by_length: bool = True  # batches of similar length (LLaVA's group_by_modality_length)
    length_group_size: int = 16  # batches sorted together
    pad_to_multiple_of: int = 8  # batch length rounding (PP > 1 pads every batch to model.llm.seq_length)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    tokenizer: VLMTokenizerConfig = field(default_factory=VLMTokenizerConfig)
    synthetic: SyntheticVQAConfig = field(default_factory=SyntheticVQAConfig)


@dataclass
class VLMEvalConfig:
    batch_size: int = 32
    num_batches: int = 0  # evaluation batches (0: the whole eval set), split over DP ranks


@dataclass
class VLMExperimentConfig(ExperimentConfig):
    """One VLM training stage (connector pretraining or instruction tuning)."""

    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(output_dir="runs/vlm"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.0e-3, weight_decay=0.0, betas=[0.9, 0.999],
                                                                   eps=1.0e-8))
    model: VLMConfig = field(default_factory=VLMConfig)
    data: VLMDataConfig = field(default_factory=VLMDataConfig)
    eval: VLMEvalConfig = field(default_factory=VLMEvalConfig)

    RULES: ClassVar[list] = [
        ("model.attention_backend", one_of("sdpa", "flash", "te")),
        ("model.vision.patch_dim", at_least(1, integer=True)),
        ("model.vision.img_h", at_least(1, integer=True)),
        ("model.vision.img_w", at_least(1, integer=True)),
        ("model.vision.class_token_length", at_least(0, integer=True)),
        ("model.vision.activation", one_of("gelu", "quick_gelu")),
        ("model.vision.layernorm_epsilon", greater_than(0)),
        ("model.connector.type", one_of("mlp", "perceiver")),
        ("model.connector.mlp_depth", at_least(1, integer=True)),
        ("model.connector.perceiver.depth", at_least(1, integer=True)),
        ("model.connector.perceiver.n_latents", at_least(1, integer=True)),
        ("model.connector.perceiver.n_heads", at_least(1, integer=True)),
        ("model.connector.perceiver.head_dim", at_least(1, integer=True)),
        ("model.connector.perceiver.n_query_groups", at_least(1, integer=True)),
        ("model.connector.perceiver.attention_dropout", probability()),
        ("model.connector.perceiver.ffn_hidden_size", at_least(1, integer=True)),
        ("model.connector.perceiver.layernorm_epsilon", greater_than(0)),
        ("model.llm.num_query_groups", at_least(1, integer=True)),
        ("model.llm.seq_length", at_least(2, integer=True)),
        ("model.llm.vocab_size", at_least(1, integer=True)),
        ("model.llm.normalization", one_of("RMSNorm", "LayerNorm")),
        ("model.llm.activation", one_of("swiglu", "geglu", "gelu", "silu", "relu")),
        ("model.llm.rotary_base", greater_than(0)),
        ("model.*activations_checkpoint_granularity", one_of("full", "selective")),
        ("model.*activations_checkpoint_method", one_of("uniform", "block")),
        ("model.*activations_checkpoint_num_layers", at_least(1, integer=True)),
        ("model.lora.rank", at_least(1, integer=True)),
        ("model.lora.alpha", greater_than(0)),
        ("model.lora.dropout", probability()),
        ("data.text_batch_fraction", probability(upper_open=False)),
        ("data.length_group_size", at_least(1, integer=True)),
        ("data.pad_to_multiple_of", at_least(1, integer=True)),
        ("data.tokenizer.type", one_of("huggingface", "sentencepiece")),
        ("data.synthetic.num_train", at_least(1, integer=True)),
        ("data.synthetic.num_eval", at_least(0, integer=True)),
        ("data.synthetic.image_size", at_least(16, integer=True)),
        ("data.synthetic.max_turns", at_least(1, integer=True)),
        ("eval.num_batches", at_least(0, integer=True)),
    ]


def vision_problems(cfg: VLMConfig) -> list[str]:
    """Value problems of the vision section that no single-key rule sees."""
    v, problems = cfg.vision, []
    if v.img_h % v.patch_dim or v.img_w % v.patch_dim:
        problems.append(f"model.vision.img_h x img_w = {v.img_h}x{v.img_w} is not divisible by "
                        f"model.vision.patch_dim={v.patch_dim}")
    k = v.feature_select_index
    if k == 0 or not -v.num_layers <= k <= v.num_layers:
        problems.append(f"model.vision.feature_select_index={k} must be in -{v.num_layers}..-1 or 1..{v.num_layers} "
                        f"(the output of a layer, as Hugging Face's hidden_states[k]; model.vision.num_layers="
                        f"{v.num_layers})")
    if v.use_cls and v.class_token_length == 0:
        problems.append("model.vision.use_cls=true but model.vision.class_token_length=0: there is no class token")
    return problems
