"""Each CLIP size in configs/clip/ against NeMo's size table (../shared/seeds/nemo_clip.txt).

Models are built on the meta device: no memory is allocated, even for e/14. Every count is also
computed here, from the table's dimensions and a formula written out below (not from the model
code), and the built model must match it to the parameter. Rows of the table that are not
self-consistent are recorded with the count the listed dimensions give and the reason they differ.
"""
import pytest
import torch

from engine.config import load_config
from models.clip.config import CLIPExperimentConfig as ExperimentConfig
from models.clip.model import CLIPModel, count_parameters

# size file: (vision M, text M) as printed in the table, and which of them follow from its dimensions.
TABLE = {
    "b32": (87.85, 63.43),
    "b16": (86.19, 91.16),
    "l14": (303.97, 123.65),
    "h14": (638.08, 354.03),
    "g14": (1012.65, 354.03),
    "G14": (1840.0, 590.0),
    "e14": (2200.0, 660.0),
}

# Where the listed dimensions give another count: (vision M, text M) computed here, and why.
INCONSISTENT = {
    # B/16 text has the same dimensions as B/32 text (512 wide, 12 layers, vocab 49408, context 77),
    # so it must also be 63.43M; 91.16M does not follow from the row.
    "b16": ((86.19, 63.43), "text column: same dims as B/32 text"),
    # open_clip's ViT-H/14 visual is 632.08M; the table's 638.08 looks like a typo in one digit.
    "h14": ((632.08, 354.03), "vision column: 638.08 vs 632.08 from 1280x32 layers, FFN 5120"),
    # G/14 vision is printed rounded (1840 ~ 1844.91). Text 1280 wide x 32 layers gives 694.66M, not
    # 590M (open_clip ViT-bigG-14 text tower is also 694.66M).
    "G14": ((1844.91, 694.66), "text column: 590 does not follow from 1280 wide x 32 layers"),
    # e/14: 1792 wide, FFN 15360, 56 layers is 3807.72M, not 2200M; text 1280 x 36 layers is 773.37M.
    "e14": ((3807.72, 773.37), "both columns: 2200/660 do not follow from the listed dimensions"),
}


# NeMo's table as dimensions: vision (width, layers, FFN, patch), text (width, layers, FFN), output dim.
# FFN is 4x the width where the table gives none; B/32 and B/16 take the patch their names say (the
# table's patch column has them swapped). Every size: 224 px images, one class token, CLIP's BPE
# vocabulary (49408, padded to a multiple of 128) and a 77-token context.
DIMENSIONS = {
    "b32": ((768, 12, 3072, 32), (512, 12, 2048), 512),
    "b16": ((768, 12, 3072, 16), (512, 12, 2048), 512),
    "l14": ((1024, 24, 4096, 14), (768, 12, 3072), 768),
    "h14": ((1280, 32, 5120, 14), (1024, 24, 4096), 1024),
    "g14": ((1408, 40, 6144, 14), (1024, 24, 4096), 1024),
    "G14": ((1664, 48, 8192, 14), (1280, 32, 5120), 1280),
    "e14": ((1792, 56, 15360, 14), (1280, 36, 5120), 1280),
}
IMAGE, VOCAB, CONTEXT = 224, 49408, 77


def layer_params(width: int, ffn: int) -> int:
    """One pre-norm transformer layer, every linear with a bias."""
    attention = (3 * width * width + 3 * width) + (width * width + width)  # fused qkv, output projection
    mlp = (width * ffn + ffn) + (ffn * width + width)  # fc1, fc2
    norms = 2 * (2 * width)  # two layernorms (weight and bias)
    return attention + mlp + norms


def vision_params(width: int, layers: int, ffn: int, patch: int, output_dim: int, image: int = IMAGE) -> int:
    tokens = (image // patch) ** 2 + 1  # patches and the class token
    return (3 * patch * patch * width  # patch embedding (a conv without bias)
            + width + tokens * width  # class token, positions
            + 2 * width  # ln_pre
            + layers * layer_params(width, ffn)
            + 2 * width  # ln_post
            + width * output_dim)  # projection, no bias


def text_params(width: int, layers: int, ffn: int, output_dim: int, vocab: int = VOCAB, context: int = CONTEXT) -> int:
    rows = -(-vocab // 128) * 128  # Megatron pads the embedding to a multiple of 128 (x TP)
    return (rows * width + context * width  # token embedding, positions
            + layers * layer_params(width, ffn)
            + 2 * width  # ln_final
            + width * output_dim)  # projection, no bias


def expected_counts(size: str) -> tuple[int, int]:
    (v_width, v_layers, v_ffn, patch), (t_width, t_layers, t_ffn), output_dim = DIMENSIONS[size]
    return (vision_params(v_width, v_layers, v_ffn, patch, output_dim),
            text_params(t_width, t_layers, t_ffn, output_dim))


def test_formula_by_hand():
    # B/16 text worked out once: 12 layers of 3,152,384 (3,145,728 weights + 6,656 biases and norm
    # parameters), 25,296,896 token and 39,424 position embeddings, 1,024 ln_final, 262,144 projection.
    assert layer_params(512, 2048) == 4 * 512 * 512 + 2 * 512 * 2048 + 9 * 512 + 2048 == 3_152_384
    assert text_params(512, 12, 2048, 512) == 12 * 3_152_384 + 25_296_896 + 39_424 + 1_024 + 262_144 == 63_428_096
    # e/14 vision: 56 layers of 67,926,784, a 588-input patch embedding, 257 positions.
    assert layer_params(1792, 15360) == 67_926_784
    assert vision_params(1792, 56, 15360, 14, 1280) == (56 * 67_926_784 + 588 * 1792 + 1792 + 257 * 1792
                                                        + 4 * 1792 + 1792 * 1280) == 3_807_716_864


def build_on_meta(size: str) -> CLIPModel:
    cfg = load_config(ExperimentConfig, f"configs/clip/{size}.yaml")
    with torch.device("meta"):
        return CLIPModel(cfg.model, use_cpu_initialization=True, perform_initialization=False)


@pytest.mark.parametrize("size", list(TABLE))
def test_parameter_count_matches_formula(single_rank, size):
    model = build_on_meta(size)
    assert (count_parameters(model.visual), count_parameters(model.text)) == expected_counts(size)
    # logit_scale is the only parameter outside the towers
    assert count_parameters(model) == sum(expected_counts(size)) + 1


@pytest.mark.parametrize("size", list(TABLE))
def test_parameter_count_matches_table(size):
    vision, text = (round(count / 1e6, 2) for count in expected_counts(size))
    if size in INCONSISTENT:
        expected, _why = INCONSISTENT[size]
        assert (vision, text) == expected
        table_vision, table_text = TABLE[size]
        # The table's self-consistent column still has to match.
        if size == "b16":
            assert vision == table_vision
        if size == "h14":
            assert text == table_text
        if size == "G14":
            assert abs(vision - table_vision) / table_vision < 0.005  # printed to 3 significant digits
    else:
        assert (vision, text) == TABLE[size]


def test_output_dim_interpolates_into_towers(single_rank):
    cfg = load_config(ExperimentConfig, "configs/clip/l14.yaml", ["model.output_dim=123"])
    assert cfg.model.vision.output_dim == 123 and cfg.model.text.output_dim == 123


@pytest.mark.parametrize("size", list(TABLE))
def test_memory_estimator_counts_the_built_model(single_rank, size):
    from engine.memory_estimate import params_per_rank

    cfg = load_config(ExperimentConfig, f"configs/clip/{size}.yaml")
    assert params_per_rank(cfg.model, tp=1) == count_parameters(build_on_meta(size))
