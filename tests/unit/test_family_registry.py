"""The engine knows no family: it imports none, finds them in models/registry.py, and gives every
registered family the same config loading, `--help`, layout checks and suggestions."""
import ast
import glob
import os
import subprocess
import sys

import pytest
import yaml

from engine.config import ConfigError, load_config, schema_keys
from engine.family import ModelFamily, family_names, get_family
from engine.layout import validate_layout
from engine.schema import BARE_KEYS
from parallel.dims import ParallelLayoutError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _imports(path: str) -> list[str]:
    tree = ast.parse(open(path).read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_engine_imports_no_model_family():
    offenders = []
    for path in glob.glob(os.path.join(REPO, "engine", "**", "*.py"), recursive=True):
        offenders += [f"{os.path.relpath(path, REPO)}: {name}" for name in _imports(path)
                      if name == "models" or name.startswith("models.")]
    assert not offenders, offenders
    # The registry is reached by name only, so no family module is imported by the engine.
    assert "models.registry" in open(os.path.join(REPO, "engine", "family.py")).read()


def test_every_registered_family_is_a_model_family():
    assert "clip" in family_names()
    for name in family_names():
        family = get_family(name)
        assert isinstance(family, ModelFamily) and family.name == name
        assert os.path.exists(os.path.join(REPO, family.entry_point)), family.entry_point


def test_unknown_family_suggests_closest():
    with pytest.raises(KeyError, match="did you mean 'clip'"):
        get_family("clpi")


@pytest.mark.parametrize("name", family_names())
def test_family_configs_mirror_the_schema(name):
    """Every configs/<family>/*.yaml lists exactly the family's schema keys."""
    family = get_family(name)
    files = sorted(glob.glob(os.path.join(REPO, "configs", name, "**", "*.yaml"), recursive=True))
    assert files, f"configs/{name}/ has no config"

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    for path in files:
        with open(path) as fh:
            assert sorted(leaves(yaml.safe_load(fh))) == sorted(schema_keys(family.config_cls)), path
        load_config(family.config_cls, path, [], BARE_KEYS, aliases=family.config_aliases)


@pytest.mark.parametrize("name", family_names())
def test_unknown_key_and_bare_keys_work_for_every_family(name):
    family = get_family(name)
    cfg = load_config(family.config_cls, None, ["tensor_model_parallel_size=2"], BARE_KEYS)
    assert cfg.parallel.tensor_model_parallel_size == 2
    with pytest.raises(ConfigError, match=r"'trainer.max_steps'"):
        load_config(family.config_cls, None, ["trainer.max_step=3"], BARE_KEYS)


@pytest.mark.parametrize("name", family_names())
def test_help_lists_the_family_keys(name):
    family = get_family(name)
    out = subprocess.run([sys.executable, family.entry_point, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for key in ("parallel.tensor_model_parallel_size", "trainer.max_steps", "checkpoint.resume",
                schema_keys(family.config_cls)[-1]):
        assert key in out.stdout


def test_layout_reports_every_problem_and_a_command_that_keeps_the_arguments():
    clip = get_family("clip")
    argv = ["--config", "configs/clip/tiny.yaml", "tensor_model_parallel_size=3", "trainer.max_steps=7",
            "pipeline_model_parallel_size=3"]
    cfg = load_config(clip.config_cls, "configs/clip/tiny.yaml", argv[2:], BARE_KEYS)
    with pytest.raises(ParallelLayoutError) as info:
        validate_layout(cfg, 9, clip, argv)
    message = str(info.value)
    for problem in ("model.vision.num_attention_heads=4 is not divisible by tensor_model_parallel_size=3",
                    "model.text.num_attention_heads=4", "model.vision.num_layers=4 is not divisible by "
                    "pipeline_model_parallel_size=3", "model.text.num_layers"):
        assert problem in message, message
    suggestion = message.split("a layout that fits: `")[1].rstrip("`")
    assert "--config configs/clip/tiny.yaml" in suggestion and "trainer.max_steps=7" in suggestion
    # Following the suggestion gives a layout that passes every check.
    words = suggestion.split()
    script = words.index(clip.entry_point)
    overrides = [w for w in words[script + 3:]]
    fixed = load_config(clip.config_cls, "configs/clip/tiny.yaml", overrides, BARE_KEYS)
    nproc = int(words[1].split("=")[1]) if words[0] == "torchrun" else 1
    validate_layout(fixed, nproc, clip, words[script + 1:])


def test_short_world_suggests_more_processes_with_the_same_arguments():
    clip = get_family("clip")
    argv = ["--config", "configs/clip/tiny.yaml", "tensor_model_parallel_size=4"]
    cfg = load_config(clip.config_cls, "configs/clip/tiny.yaml", argv[2:], BARE_KEYS)
    with pytest.raises(ParallelLayoutError, match=r"world size 1 is not divisible") as info:
        validate_layout(cfg, 1, clip, argv)
    assert ("`torchrun --nproc_per_node=4 examples/pretrain_clip.py --config configs/clip/tiny.yaml "
            "tensor_model_parallel_size=4`") in str(info.value)


@pytest.mark.parametrize("name", family_names())
def test_bad_layout_stops_every_family_entry_point_before_any_process_group(name, tmp_path):
    """Through the real entry point, one process: TP=3 divides neither the world nor the tiny
    model's heads; exit 2 with every problem named, before the run writes anything (the checks
    run before process groups exist)."""
    family = get_family(name)
    out = subprocess.run([sys.executable, family.entry_point, "--config", f"configs/{name}/tiny.yaml",
                          "tensor_model_parallel_size=3", f"trainer.output_dir={tmp_path}/run", "device=cpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    error = out.stderr[out.stderr.index("error: "):]  # torch may warn before it (no CUDA runtime)
    assert "world size 1 is not divisible by tensor_model_parallel_size=3" in error
    assert "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3" in error
    assert "a layout that fits:" in error and family.entry_point in error
    assert not (tmp_path / "run").exists()
