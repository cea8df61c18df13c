"""Configs are frozen data: every config class round-trips through a dict and a JSON file, unknown fields are refused
by name, and validation gives messages that name the field."""

import dataclasses
import json

import pytest
import torch

from adaptive_tokenizer import ModelConfig, VQGANConfig
from adaptive_tokenizer.config import LengthPredictorConfig
from adaptive_tokenizer.presets import DEFAULT_MODEL
from adaptive_tokenizer.base_tokenizer import VQGAN


CONFIGS = [VQGANConfig(), VQGANConfig(ch=32, ch_mult=(1, 2), norm_groups=8, shortcut="input"),
           LengthPredictorConfig(num_inputs=11), LengthPredictorConfig(features=("pixels", "latents"), num_inputs=9),
           ModelConfig(), ModelConfig(length_predictor=LengthPredictorConfig(num_inputs=5))]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_every_config_class_round_trips_through_dict_and_json(config, tmp_path):
    cls = type(config)
    data = config.to_dict()
    assert cls.from_dict(data) == config
    assert cls.from_dict(json.loads(json.dumps(data))) == config  # JSON turns tuples into lists
    assert cls.from_dict(json.loads(config.to_json_string())) == config
    config.to_json(tmp_path / "c.json")
    assert cls.from_json(tmp_path / "c.json") == config
    assert not [p for p in tmp_path.iterdir() if p.name != "c.json"]  # written atomically: no temporary left


@pytest.mark.parametrize("cls,where", [(VQGANConfig, "config base"), (LengthPredictorConfig, "config length_predictor"),
                                       (ModelConfig, "config")])
def test_every_config_class_refuses_unknown_fields_and_non_objects(cls, where, tmp_path):
    with pytest.raises(ValueError, match=f"^{where} has unknown fields \\['depth'\\]"):
        cls.from_dict({"depth": 2})
    with pytest.raises(ValueError, match=f"^{where} must be a JSON object"):
        cls.from_dict([1, 2])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        cls.from_json(tmp_path / "list.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        cls.from_json(tmp_path / "bad.json")


def test_nested_configs_must_be_objects():
    for field in ("base", "length_predictor"):
        data = {**ModelConfig().to_dict(), field: 5}
        with pytest.raises(ValueError, match=f"config {field} must be a JSON object, got int"):
            ModelConfig.from_dict(data)


def test_json_round_trip(tmp_path):
    config = ModelConfig(base=VQGANConfig(ch=32, ch_mult=(1, 1, 1), resolution=64, z_channels=32, codebook_dim=32),
                         image_size=64, patch_size=4, encoder_width=64, mlp_ratio=2.0, decoder_width=64, encoder_heads=4,
                         decoder_heads=4, latent_kind="continuous")
    config.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json") == config


def test_base_architecture_options_round_trip_and_default_for_older_files(tmp_path):
    config = ModelConfig(base=VQGANConfig(ch=32, ch_mult=(1, 2), resolution=32, z_channels=32, codebook_dim=32,
                                          codebook_size=16, norm_groups=8, shortcut="input"),
                         image_size=32, patch_size=2)
    config.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json") == config
    model = VQGAN(config.base)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and {m.num_groups for m in norms} == {8}
    # shortcut="input": a channel-changing block adds a 1x1 conv of its input to the branch output
    block = model.encoder.down[1].block[0]
    x = torch.randn(2, 32, 8, 8)
    branch = block.conv2(torch.nn.functional.silu(block.norm2(block.conv1(torch.nn.functional.silu(block.norm1(x))))))
    torch.testing.assert_close(block(x), block.shortcut(x) + branch)
    data = json.loads((tmp_path / "config.json").read_text())
    del data["base"]["norm_groups"], data["base"]["shortcut"]  # written before the fields existed
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = ModelConfig.from_json(tmp_path / "old.json").base
    assert (old.norm_groups, old.shortcut) == (32, "branch")  # the authors'
    block = VQGAN(old).encoder.down[1].block[0]  # shortcut="branch": the conv reads the branch output
    assert block.shortcut.in_channels == block.shortcut.out_channels == 64


def test_length_predictor_round_trips_and_defaults_to_none(tmp_path):
    head = LengthPredictorConfig(features=("pixels", "class"), hidden=16, num_inputs=11 + 512)
    config = ModelConfig().replace(length_predictor=head)
    config.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json") == config
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["length_predictor"] == {"features": ["pixels", "class"], "hidden": 16, "num_inputs": 523,
                                        "margin": 0.0}
    del data["length_predictor"]  # written before the field existed
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert ModelConfig.from_json(tmp_path / "old.json").length_predictor is None


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().encoder_width = 3


def test_derived_sizes():
    config = ModelConfig()
    assert (config.grid_size, config.num_image_tokens, config.max_tokens, config.latent_dim) == (16, 256, 256, 12)


@pytest.mark.parametrize("changes,message", [
    ({"encoder_width": 516, "encoder_heads": 8}, "encoder_width 516 is not divisible"),
    ({"patch_size": 32}, "grid"),
    ({"latent_kind": "discrete"}, "latent_kind"),
    ({"factorize_latent": False}, "factorize_latent"),
    ({"max_iterations": 9}, "decoder_max_latent_tokens"),
    ({"dynamic_halting_confidence": 1.5}, "probability"),
    ({"length_predictor": {"features": ["latents", "pixels"], "num_inputs": 5}}, "subset of .* in that order"),
    ({"length_predictor": {"features": ["pixels"], "hidden": -1, "num_inputs": 11}}, "hidden must be an int"),
    ({"length_predictor": {"features": ["pixels"], "num_inputs": 0}}, "num_inputs must be a positive int"),
    ({"length_predictor": {"features": ["pixels"], "num_inputs": 11, "depth": 2}}, "unknown fields \\['depth'\\]"),
    ({"encoder_layers": 0}, "encoder_layers must be a positive int"),
    ({"encoder_width": 256, "encoder_heads": 8}, "must exceed base.z_channels"),
])
def test_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig().replace(**changes)


def test_unknown_fields_are_rejected():
    data = ModelConfig().to_dict()
    data["encoder_depth"] = 3
    with pytest.raises(ValueError, match="encoder_depth"):
        ModelConfig.from_dict(data)
    data = ModelConfig().to_dict()
    data["format_version"] = 99
    with pytest.raises(ValueError, match="format_version"):
        ModelConfig.from_dict(data)


def test_base_validation():
    with pytest.raises(ValueError, match=r"multiple of norm_groups \(32\)"):
        VQGANConfig(ch=48).validate()
    VQGANConfig(ch=48, norm_groups=16, codebook_dim=256).validate()  # fewer groups: other widths
    with pytest.raises(ValueError, match="norm_groups"):
        VQGANConfig(norm_groups=0).validate()
    with pytest.raises(ValueError, match="shortcut must be 'branch'"):
        VQGANConfig(shortcut="output").validate()
    with pytest.raises(ValueError, match="codebook_dim"):
        VQGANConfig(codebook_dim=64).validate()


def test_files_with_the_earlier_name_of_the_halting_probability_still_load():
    """``dynamic_halting_threshold`` (the per-token probability of dynamic halting, renamed so that it cannot be
    mistaken for the per-image target error ``halt_threshold``) loads as ``dynamic_halting_confidence``."""
    data = DEFAULT_MODEL.replace(dynamic_halting=True).to_dict()
    data["dynamic_halting_threshold"] = data.pop("dynamic_halting_confidence")
    data["dynamic_halting_threshold"] = 0.3
    config = ModelConfig.from_dict(data)
    assert config.dynamic_halting_confidence == 0.3
    assert "dynamic_halting_threshold" not in config.to_dict()
