"""Config values are range-checked when the config loads (every problem at once, each naming its
key), a key given twice is an error, and NeMo's documented key paths are accepted as aliases."""
import os
import re
import subprocess
import sys

import pytest

from engine.config import ConfigError, load_config
from engine.schema import BARE_KEYS
from models.clip.config import CLIPExperimentConfig
from models.clip.family import NEMO_ALIASES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEMO_TABLE = os.path.join(REPO, "..", "shared", "seeds", "nemo_clip.txt")


def _load(*overrides, aliases=None):
    return load_config(CLIPExperimentConfig, os.path.join(REPO, "configs/clip/tiny.yaml"), list(overrides), BARE_KEYS,
                       aliases=aliases)


@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=-5", "trainer.max_steps=-5 must be an integer >= 0"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size=0 must be an integer >= 1"),
    ("trainer.precision=fp64", "trainer.precision='fp64' must be one of"),
    ("optim.name=adamw8", "optim.name='adamw8' must be one of adamw, adam, distributed_fused_adam, adamw_8bit"),
    ("optim.sched.name=linear", "optim.sched.name='linear' must be one of cosine, constant, onecycle"),
    ("optim.lr=0", "optim.lr=0.0 must be > 0"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5] values must lie in [0.0, 1.0)"),
    ("model.vision.hidden_dropout=1.5", "model.vision.hidden_dropout=1.5 must be in [0, 1)"),
    ("model.text.num_layers=0", "model.text.num_layers=0 must be an integer >= 1"),
    ("model.attention_backend=cudnn", "model.attention_backend='cudnn' must be one of sdpa, flash, te"),
    ("data.random_crop_scale=[0.9,0.5]", "data.random_crop_scale=[0.9, 0.5] must be ascending"),
    ("eval.batch_size=-1", "eval.batch_size=-1 must be an integer >= 1"),
    ("trainer.loss_scaler.backoff_factor=2", "trainer.loss_scaler.backoff_factor=2.0 must be in [0, 1)"),
    ("parallel.distributed_timeout_minutes=0", "parallel.distributed_timeout_minutes=0.0 must be > 0"),
])
def test_out_of_range_values_name_their_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _load(override)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        _load("trainer.max_steps=-5", "optim.name=sgd", "model.text.attention_dropout=-0.1")
    text = str(info.value)
    assert "trainer.max_steps" in text and "optim.name" in text and "model.text.attention_dropout" in text


def test_a_key_given_twice_shows_both_values():
    with pytest.raises(ConfigError, match=r"'data.train_shards' is given twice.*'data.train_shards=a/0.tar' and "
                                          r"'data.train_shards=a/1.tar'"):
        _load("data.train_shards=a/0.tar", "data.train_shards=a/1.tar")
    # what a shell makes of an unquoted data.train_shards=a/{0,1}.tar under brace expansion off: extra words
    with pytest.raises(ConfigError, match=r"'a/1.tar' is not of the form key=value.*quote the value"):
        _load("data.train_shards=a/0.tar", "a/1.tar")
    assert _load("trainer.max_steps=3", "trainer.max_steps=3").trainer.max_steps == 3  # same value: harmless


def test_negative_steps_stop_the_launcher_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "examples/pretrain_clip.py", "--config", "configs/clip/tiny.yaml",
                             "trainer.max_steps=-5", f"trainer.output_dir={out}"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "error: invalid config value: trainer.max_steps=-5 must be an integer >= 0" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def nemo_to_enable_keys() -> list[str]:
    """Every ``key=value`` of the "To Enable" column of NeMo's CLIP feature table, placeholders filled."""
    with open(NEMO_TABLE) as fh:
        text = fh.read()
    table = text[text.index("| Feature "):text.index("Model Training")]
    cells = [row.split("|")[3] for row in table.splitlines() if row.startswith("|") and row.count("|") >= 4][1:]
    keys = re.findall(r"``([^`=]+=[^`]+)``", "\n".join(cells))
    fill = {"{parallel_size}": "2", "{num_layers_to_check}": "1"}
    out = []
    for item in keys:
        for placeholder, value in fill.items():
            item = item.replace(placeholder, value)
        out.append(item.replace('"', ""))
    return out


def test_every_nemo_to_enable_key_is_accepted():
    keys = nemo_to_enable_keys()
    assert len(keys) == 9, keys  # TP, 3 recompute keys, bf16, O2, distributed optimizer, 2 flash-attn keys
    cfg = _load(*keys, aliases=NEMO_ALIASES)
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert (cfg.model.vision.activations_checkpoint_granularity, cfg.model.vision.activations_checkpoint_method,
            cfg.model.vision.activations_checkpoint_num_layers) == ("full", "block", 1)
    assert cfg.trainer.precision == "bf16" and cfg.model.megatron_amp_O2 is True
    assert cfg.optim.name == "distributed_fused_adam" and cfg.model.use_flash_attention is True
    # "(Same for model.llm)": the text tower
    llm = _load("model.llm.activations_checkpoint_granularity=selective", aliases=NEMO_ALIASES)
    assert llm.model.text.activations_checkpoint_granularity == "selective"


def test_aliases_in_a_config_file(tmp_path):
    path = tmp_path / "nemo.yaml"
    path.write_text("model:\n  tensor_model_parallel_size: 2\n  optim:\n    name: distributed_fused_adam\n")
    cfg = load_config(CLIPExperimentConfig, str(path), [], BARE_KEYS, aliases=NEMO_ALIASES)
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.optim.name == "distributed_fused_adam"
