"""convert_checkpoint.py's LLM subcommands on their failure paths and a TP=1 round trip, without
transformers: the Hugging Face directory is written by conversion.hf_llama.export_hf_llama from a
random tiny LLM (tests/distributed/test_llm_checkpoints.py checks against transformers itself)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.unit.test_convert_cli import load_cli


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from conversion.hf_llama import export_hf_llama
    from engine.checkpoint.tools import single_process_parallel_state
    from engine.family import get_family
    from models.llm.config import llm_preset

    tmp = tmp_path_factory.mktemp("hf_llama_cli")
    out = {}
    for name, tied in (("tied", True), ("untied", False)):
        cfg = llm_preset("tiny", vocab_size=100, share_embeddings_and_output_weights=tied)
        torch.manual_seed(3)
        with single_process_parallel_state():
            state = get_family("llm").reference_model(cfg).state_dict()
        export_hf_llama(state, cfg, str(tmp / name), max_shard_bytes=200_000)  # sharded, with an index
        out[name] = (str(tmp / name), state)
    return tmp, out


def test_import_export_round_trip_is_exact_and_writes_a_config_to_train_with(hf_dirs, capsys):
    from engine.checkpoint.tools import read_model_checkpoint

    tmp, dirs = hf_dirs
    cli = load_cli()
    source, state = dirs["untied"]
    assert len([f for f in os.listdir(source) if f.endswith(".safetensors")]) > 1
    ckpt, yaml_path = str(tmp / "ckpt_untied"), str(tmp / "untied.yaml")
    assert cli.main(["import-hf-llama", source, "--out", ckpt, "--save-config", yaml_path, "model.seq_length=64"]) == 0
    exp, full = read_model_checkpoint(ckpt)
    assert exp.model.seq_length == 64 and exp.model.vocab_size == 100 and exp.model.layernorm_epsilon == 1e-5
    for key, tensor in state.items():
        if torch.is_tensor(tensor):  # vocabulary rows past the 100 real ones are padding (zeros after HF)
            rows = 100 if key in ("embedding.word_embeddings.weight", "output_layer.weight") else tensor.shape[0]
            assert torch.equal(full[key][:rows], tensor[:rows]), key
    text = open(yaml_path).read()
    assert f"checkpoint.init_from={ckpt}" in text and "seq_length: 64" in text
    assert cli.main(["export-hf-llama", ckpt, "--out", str(tmp / "back_untied")]) == 0
    from conversion.hf_dir import read_hf_weights

    assert read_hf_weights(str(tmp / "back_untied")).keys() == read_hf_weights(source).keys()
    config = json.load(open(tmp / "back_untied" / "config.json"))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is False
    # A model.* override that changes a weight shape is refused.
    assert cli.main(["import-hf-llama", source, "--out", str(tmp / "bad"), "model.hidden_size=32"]) == 2
    assert "change the model's weight shapes" in capsys.readouterr().err and not os.path.exists(tmp / "bad")


def test_import_refuses_what_cannot_work_before_writing(hf_dirs, capsys):
    tmp, dirs = hf_dirs
    cli = load_cli()
    source = dirs["tied"][0]
    out = str(tmp / "tied_pp2")
    assert cli.main(["import-hf-llama", source, "--out", out, "--pipeline-model-parallel-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--untie-embeddings" in err and "model.share_embeddings_and_output_weights" in err
    assert not os.path.exists(out)
    assert cli.main(["import-hf-llama", source, "--out", out, "--pipeline-model-parallel-size", "2",
                     "--untie-embeddings"]) == 0
    assert cli.main(["import-hf-llama", source, "--out", out]) == 2  # the output exists
    assert "exists" in capsys.readouterr().err
    (tmp / "taken.yaml").write_text("x: 1\n")
    assert cli.main(["import-hf-llama", source, "--out", str(tmp / "other"), "--save-config",
                     str(tmp / "taken.yaml")]) == 2
    assert not os.path.exists(tmp / "other") and (tmp / "taken.yaml").read_text() == "x: 1\n"
    assert cli.main(["import-hf-llama", str(tmp / "no_such_dir"), "--out", str(tmp / "other")]) == 2
    assert cli.main(["import-hf-llama", source, "--out", str(tmp / "other"), "--tensor-model-parallel-size", "3"]) == 2
    assert "model.num_attention_heads=4 is not divisible by tensor_model_parallel_size=3" in capsys.readouterr().err


def test_export_refuses_other_families_and_existing_targets(hf_dirs, capsys):
    from engine.checkpoint.tools import write_model_checkpoint
    from engine.config import load_config
    from models.clip.config import CLIPExperimentConfig

    tmp, dirs = hf_dirs
    cli = load_cli()
    ckpt = str(tmp / "ckpt_tied")
    assert cli.main(["import-hf-llama", dirs["tied"][0], "--out", ckpt]) == 0
    assert cli.main(["export-hf-llama", ckpt, "--out", str(tmp / "hf_out")]) == 0
    before = open(tmp / "hf_out" / "config.json").read()
    assert cli.main(["export-hf-llama", ckpt, "--out", str(tmp / "hf_out")]) == 2
    assert "--overwrite" in capsys.readouterr().err and open(tmp / "hf_out" / "config.json").read() == before
    assert cli.main(["export-hf-llama", ckpt, "--out", str(tmp / "hf_out"), "--overwrite",
                     "--max-shard-size", "100KB"]) == 0
    assert not os.path.exists(tmp / "hf_out" / "model.safetensors")  # the earlier single file is gone
    assert os.path.exists(tmp / "hf_out" / "model.safetensors.index.json")
    assert cli.main(["export-hf-llama", ckpt, "--out", os.path.join(ckpt, "hf")]) == 2
    assert "engine checkpoint" in capsys.readouterr().err
    clip = load_config(CLIPExperimentConfig, "configs/clip/tiny.yaml")
    from engine.checkpoint.tools import reference_specs
    from engine.family import get_family

    specs, _, dtypes = reference_specs(get_family("clip"), clip.model)
    write_model_checkpoint(str(tmp / "clip"), clip, {k: torch.zeros(s.global_shape, dtype=dtypes[k])
                                                     for k, s in specs.items()})
    assert cli.main(["export-hf-llama", str(tmp / "clip"), "--out", str(tmp / "clip_hf")]) == 2
    assert "not an LLM checkpoint" in capsys.readouterr().err
