"""Layouts that cannot be placed fail before any process group exists, naming the key to change."""
import pytest

from engine.config import load_config
from engine.family import get_family
from engine.layout import validate_layout
from engine.schema import BARE_KEYS
from models.clip.config import CLIPExperimentConfig as ExperimentConfig
from parallel.dims import ParallelLayoutError


def _cfg(*overrides):
    return load_config(ExperimentConfig, "configs/clip/tiny.yaml", list(overrides), BARE_KEYS)


def test_valid_pipeline_layout():
    dims = validate_layout(_cfg("pipeline_model_parallel_size=2", "trainer.micro_batch_size=32"), 4, get_family("clip"))
    assert (dims.tp, dims.pp, dims.dp) == (1, 2, 2)


@pytest.mark.parametrize("overrides, world, message", [
    (["pipeline_model_parallel_size=3"], 3, "model.vision.num_layers=4 is not divisible by pipeline_model_parallel_size=3"),
    (["pipeline_model_parallel_size=2", "model.text.num_layers=3"], 2, "model.text.num_layers=3"),
    (["tensor_model_parallel_size=3"], 3, "num_attention_heads"),
    (["tensor_model_parallel_size=2"], 3, "world size 3 is not divisible"),
    (["trainer.micro_batch_size=48"], 2, "global_batch_size=128 is not divisible"),
])
def test_bad_layouts_name_the_key(overrides, world, message):
    with pytest.raises(ParallelLayoutError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_layout(_cfg(*overrides), world, get_family("clip"))


# Every layout of 1, 2 and 4 ranks: (world size, TP, PP); DP is what is left.
DEMO_LAYOUTS = [(1, 1, 1), (2, 2, 1), (2, 1, 2), (2, 1, 1), (4, 4, 1), (4, 1, 4), (4, 2, 2), (4, 2, 1), (4, 1, 2),
                (4, 1, 1)]


@pytest.mark.parametrize("world, tp, pp", DEMO_LAYOUTS,
                         ids=[f"world{w}-TP{t}-PP{p}-DP{w // (t * p)}" for w, t, p in DEMO_LAYOUTS])
def test_demo_config_runs_in_every_layout_of_1_2_and_4_ranks(world, tp, pp):
    """configs/clip/tiny.yaml as it is, only the layout given: batch, heads, FFN and layers divide."""
    argv = ["--config", "configs/clip/tiny.yaml", f"tensor_model_parallel_size={tp}",
            f"pipeline_model_parallel_size={pp}"]
    cfg = load_config(ExperimentConfig, "configs/clip/tiny.yaml", argv[2:], BARE_KEYS)
    dims = validate_layout(cfg, world, get_family("clip"), argv)
    assert (dims.tp, dims.pp, dims.dp) == (tp, pp, world // (tp * pp))
    micro_batches = cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * dims.dp)
    assert micro_batches >= pp  # enough micro-batches to fill the pipeline
