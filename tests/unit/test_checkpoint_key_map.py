"""Model weights through a key map: renamed parts, names allowed to be missing (new layers keep
their initialisation) or unused, and every other difference an error that names it before anything
is read."""
import pytest
import torch

from engine.checkpoint import CheckpointError, KeyMap, load_model_weights
from engine.checkpoint.tools import write_model_checkpoint
from models.clip.config import CLIPExperimentConfig
from tests.distributed.clip_fixtures import tiny_clip_config


@pytest.fixture(scope="module")
def source(single_rank, tmp_path_factory):
    from models.clip.model import CLIPModel

    torch.manual_seed(0)
    cfg = CLIPExperimentConfig(model=tiny_clip_config())
    model = CLIPModel(cfg.model)
    path = write_model_checkpoint(str(tmp_path_factory.mktemp("keymap") / "clip"), cfg, model.state_dict())
    return model, cfg, path


class Wrapped(torch.nn.Module):
    """A composite model holding the CLIP model under another name, plus a new layer (as a VLM does)."""

    def __init__(self, cfg):
        super().__init__()
        from models.clip.model import CLIPModel

        torch.manual_seed(1)
        self.tower = CLIPModel(cfg)
        self.connector = torch.nn.Linear(4, 4)


def _tensors(module):
    return {k: v for k, v in module.state_dict().items() if torch.is_tensor(v)}


def test_same_names_load_exactly(source):
    from models.clip.model import CLIPModel

    model, cfg, path = source
    torch.manual_seed(5)
    other = CLIPModel(cfg.model)
    report = load_model_weights(path, other)
    for key, value in _tensors(model).items():
        assert torch.equal(other.state_dict()[key], value), key
    assert report.missing == [] and report.unused == []


def test_renamed_part_with_a_new_layer(source):
    model, cfg, path = source
    wrapped = Wrapped(cfg.model)
    connector_before = wrapped.connector.weight.detach().clone()
    key_map = KeyMap(rename=[(r"^tower\.", "")], allow_missing=["connector.*"])
    report = load_model_weights(path, wrapped, key_map=key_map)
    for key, value in _tensors(model).items():
        assert torch.equal(wrapped.state_dict()["tower." + key], value), key
    assert torch.equal(wrapped.connector.weight, connector_before)  # kept its initialisation
    assert report.missing == ["connector.bias", "connector.weight"]


def test_a_new_layer_not_allowed_missing_is_named(source):
    _, cfg, path = source
    wrapped = Wrapped(cfg.model)
    before = wrapped.tower.logit_scale.detach().clone()
    with pytest.raises(CheckpointError, match=r"connector.weight: not in the checkpoint"):
        load_model_weights(path, wrapped, key_map=KeyMap(rename=[(r"^tower\.", "")]))
    assert torch.equal(wrapped.tower.logit_scale, before)  # nothing was loaded


def test_unused_checkpoint_tensors_must_be_allowed(source):
    _, cfg, path = source

    class VisionOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = Wrapped(cfg.model).tower.visual

    with pytest.raises(CheckpointError, match=r"checkpoint tensors this model does not read: .*text\."):
        load_model_weights(path, VisionOnly())
    report = load_model_weights(path, VisionOnly(), key_map=KeyMap(allow_unused=["text.*", "logit_scale"]))
    assert "logit_scale" in report.unused and all(not k.startswith("visual.") for k in report.unused)


def test_a_shape_that_differs_is_named(source):
    from models.clip.model import CLIPModel

    _, _, path = source
    wider = tiny_clip_config()
    wider.vision.ffn_hidden_size = 256
    with pytest.raises(CheckpointError, match=r"linear_fc1.weight: shape \(128, 64\) in the checkpoint, \(256, 64\)"):
        load_model_weights(path, CLIPModel(wider))
