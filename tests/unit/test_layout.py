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
