"""One-process checkpoint tools: model-only checkpoints from a full state dict and back, inspect,
offline re-sharding (TP and dtype), and damaged files that must be named, never loaded."""
import os

import pytest
import torch

from engine.checkpoint import CheckpointError
from engine.checkpoint.reader import CheckpointReader
from engine.checkpoint.tools import inspect_checkpoint, read_model_checkpoint, reshard_checkpoint, write_model_checkpoint
from models.clip.config import CLIPExperimentConfig as ExperimentConfig
from tests.distributed.clip_fixtures import tiny_clip_config


@pytest.fixture(scope="module")
def model_and_cfg(single_rank):
    from models.clip.model import CLIPModel

    cfg = ExperimentConfig(model=tiny_clip_config())
    cfg.model.text.vocab_size = 300  # padded to 384 at TP=1 and TP=2, 512 at TP=4
    return CLIPModel(cfg.model), cfg


@pytest.fixture()
def written(model_and_cfg, tmp_path):
    model, cfg = model_and_cfg
    return write_model_checkpoint(str(tmp_path / "ckpt"), cfg, model.state_dict())


def test_write_then_read_model_checkpoint(model_and_cfg, written, tmp_path):
    model, cfg = model_and_cfg
    cfg2, full = read_model_checkpoint(written)
    assert cfg2.model == cfg.model
    want = model.state_dict()
    assert set(full) == set(want)
    for key, value in want.items():
        if torch.is_tensor(value):
            assert torch.equal(full[key], value), key
        else:
            assert full[key] is None
    model.load_state_dict(full)  # loads as it is
    # an existing output is never overwritten
    with pytest.raises(FileExistsError):
        write_model_checkpoint(written, cfg, want)
    with pytest.raises(KeyError, match="missing"):
        write_model_checkpoint(str(tmp_path / "other"), cfg, {k: v for k, v in want.items() if "logit" not in k})
    assert not os.path.exists(tmp_path / "other")


def test_inspect_reads_descriptions_only(written):
    text = inspect_checkpoint(written)
    assert "step 0" in text and "contents: model" in text and "TP=1 PP=1 DP=1" in text
    assert "model/text.token_embedding.weight" in text and "(384, 64)" in text and "vocab padded" in text
    assert "model/visual.transformer.layers.1.self_attention.linear_qkv.weight" in text
    assert "hidden_size: 64" in text  # the config


def test_offline_reshard_to_tp4_bf16(written, tmp_path):
    out = reshard_checkpoint(written, str(tmp_path / "tp4"), 4, 1, "bf16")
    src, dst = CheckpointReader(written), CheckpointReader(out)
    assert dst.meta["layout"]["tensor_model_parallel_size"] == 4
    assert "tensor_model_parallel_size: 4" in dst.meta["config_yaml"] and "precision: bf16" in dst.meta["config_yaml"]
    for key, info in src.tensors.items():
        got = dst.read_tensor(key)
        assert got.dtype == torch.bfloat16
        want = src.read_tensor(key)
        if info["padded"]:  # 384 rows -> 512 at TP=4, zero padding
            assert got.shape[0] == 512 and not got[384:].any()
            got = got[:384]
        assert torch.equal(got, want.to(torch.bfloat16)), key
        assert len(dst.chunks(key)) == (4 if info["partition_dim"] is not None else 1)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tensor_model_parallel_size=8"):
        reshard_checkpoint(written, str(tmp_path / "tp8"), 8, 1)
    assert not os.path.exists(tmp_path / "tp8")


def test_damaged_files_are_named(written, tmp_path):
    data = sorted(n for n in os.listdir(written) if n.endswith(".distcp"))[0]
    path = os.path.join(written, data)
    original = open(path, "rb").read()
    with open(path, "r+b") as fh:  # flip one byte in the middle: same size, other content
        fh.seek(len(original) // 2)
        fh.write(bytes([original[len(original) // 2] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=f"{data}: checksum mismatch"):
        CheckpointReader(written)
    with open(path, "wb") as fh:  # truncated
        fh.write(original[: len(original) // 3])
    with pytest.raises(CheckpointError, match=f"{data}: .* bytes, {len(original)} were written"):
        read_model_checkpoint(written)
    assert "DAMAGED" in inspect_checkpoint(written)
    with open(path, "wb") as fh:
        fh.write(original)
    read_model_checkpoint(written)  # intact again
    with open(os.path.join(written, "meta.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(CheckpointError, match="meta.json: corrupt"):
        read_model_checkpoint(written)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_model_checkpoint(str(tmp_path / "nowhere"))


def test_tools_run_without_torch_distributed(tmp_path):
    """The converter CLI calls the tools in a plain process: no process group, none left behind."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import warnings; warnings.filterwarnings("ignore")
        import torch, torch.distributed as dist
        from engine.checkpoint.tools import (inspect_checkpoint, read_model_checkpoint, reshard_checkpoint,
                                             single_process_parallel_state, write_model_checkpoint)
        from models.clip.config import CLIPExperimentConfig as ExperimentConfig
        from models.clip.model import CLIPModel
        from tests.distributed.clip_fixtures import tiny_clip_config
        cfg = ExperimentConfig(model=tiny_clip_config())
        with single_process_parallel_state():
            state = CLIPModel(cfg.model).state_dict()
        assert not dist.is_initialized()
        path = write_model_checkpoint({str(tmp_path / 'w')!r}, cfg, state)
        cfg2, full = read_model_checkpoint(path)
        assert all(torch.equal(full[k], v) for k, v in state.items() if torch.is_tensor(v))
        reshard_checkpoint(path, {str(tmp_path / 'w2')!r}, 2, 2, "bf16")
        assert "TP=2 PP=2" in inspect_checkpoint({str(tmp_path / 'w2')!r})
        assert not dist.is_initialized()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_load_into_a_model_names_what_does_not_fit(model_and_cfg, written):
    from engine.checkpoint import load_into
    from engine.checkpoint.state import Placement
    from models.clip.model import CLIPModel

    model, cfg = model_and_cfg
    same = CLIPModel(cfg.model)
    meta = load_into(written, Placement(), same)
    assert meta["contents"] == ["model"]
    for key, value in model.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(same.state_dict()[key], value), key
    deeper = tiny_clip_config()
    deeper.text.vocab_size, deeper.vision.num_layers = 300, 3
    with pytest.raises(CheckpointError, match=r"model/visual.transformer.layers.2.\S+: not in the checkpoint"):
        load_into(written, Placement(), CLIPModel(deeper))
    shallower = tiny_clip_config()
    shallower.text.vocab_size, shallower.text.num_layers = 300, 1
    with pytest.raises(CheckpointError, match=r"model tensors this model does not: text.transformer.layers.1"):
        load_into(written, Placement(), CLIPModel(shallower))
    wider = tiny_clip_config()
    wider.text.vocab_size, wider.vision.ffn_hidden_size = 300, 256
    with pytest.raises(CheckpointError, match=r"linear_fc1.weight: shape \(128, 64\) in the checkpoint, \(256, 64\)"):
        load_into(written, Placement(), CLIPModel(wider))
    CheckpointReader(written)  # the checkpoint itself is untouched


def test_saved_experiment_types_the_config_and_names_another_family(model_and_cfg, written):
    from engine.checkpoint.tools import saved_experiment

    _, cfg = model_and_cfg
    path, saved = saved_experiment(written, "clip")
    assert path == CheckpointReader(written).path
    assert isinstance(saved, ExperimentConfig) and saved.model.text.vocab_size == 300
    with pytest.raises(CheckpointError, match=r"is a 'clip' checkpoint, not a 'llm' one"):
        saved_experiment(written, "llm")
