"""Config precedence (defaults < file < command line), key errors, bare keys, YAML mirrors."""
import glob
import subprocess
import sys

import pytest
import yaml

from engine.config import ConfigError, load_config, schema_keys, split_config_arg
from engine.schema import BARE_KEYS
from models.clip.config import CLIPExperimentConfig as ExperimentConfig


def _load(file=None, overrides=()):
    return load_config(ExperimentConfig, file, overrides, BARE_KEYS)


def test_precedence_defaults_file_cli(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("trainer:\n  max_steps: 50\n  log_every_n_steps: 5\nmodel:\n  output_dim: 256\n")
    defaults = _load()
    from_file = _load(str(path))
    from_cli = _load(str(path), ["trainer.max_steps=7"])
    assert defaults.trainer.max_steps == 1000
    assert from_file.trainer.max_steps == 50 and from_file.trainer.log_every_n_steps == 5
    assert from_cli.trainer.max_steps == 7 and from_cli.trainer.log_every_n_steps == 5
    # ${model.output_dim} interpolation follows whichever layer set it.
    assert from_file.model.vision.output_dim == 256 and from_file.model.text.output_dim == 256


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.max_step'.*'trainer.max_steps'"):
        _load(overrides=["trainer.max_step=3"])
    with pytest.raises(ConfigError, match=r"'model.vison.num_layers'.*'model.vision.num_layers'"):
        _load(overrides=["model.vison.num_layers=3"])


def test_unknown_key_in_file_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'optim.learning_rate'"):
        _load(str(path))


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="max_steps"):
        _load(overrides=["trainer.max_steps=many"])


def test_bare_parallel_keys():
    cfg = _load(overrides=["tensor_model_parallel_size=4", "pipeline_model_parallel_size=2"])
    assert cfg.parallel.tensor_model_parallel_size == 4
    assert cfg.parallel.pipeline_model_parallel_size == 2
    # the dotted form is the same key
    assert _load(overrides=["parallel.tensor_model_parallel_size=2"]).parallel.tensor_model_parallel_size == 2


def test_split_config_arg():
    assert split_config_arg(["--config", "a.yaml", "x=1"]) == ("a.yaml", ["x=1"])
    assert split_config_arg(["--config=b.yaml"]) == ("b.yaml", [])


@pytest.mark.parametrize("path", sorted(glob.glob("configs/clip/*.yaml")))
def test_yaml_files_mirror_schema(path):
    """Every config file lists exactly the schema's keys (1:1 mirror) and loads."""
    with open(path) as fh:
        tree = yaml.safe_load(fh)

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    assert sorted(leaves(tree)) == sorted(schema_keys(ExperimentConfig))
    _load(path)
    with open(path) as fh:
        first = fh.readline()
    assert first.startswith("#"), "config files start with a comment giving the command to run them"


def test_non_dividing_world_size_fails_fast():
    """One process asked for TP=4: a clear message before any process group exists."""
    result = subprocess.run(
        [sys.executable, "examples/pretrain_clip.py", "tensor_model_parallel_size=4"],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "", "PYTHONPATH": ".", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": "29999"},
    )
    assert result.returncode == 2
    assert "world size 1 is not divisible by tensor_model_parallel_size=4" in result.stderr
    assert "torchrun --nproc_per_node=4" in result.stderr
