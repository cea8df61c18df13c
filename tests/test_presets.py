"""Architecture presets (``presets.py``): one registry, listed by one function, looked up by name."""

import pytest

import adaptive_tokenizer
from adaptive_tokenizer import config, presets
from adaptive_tokenizer.config import ModelConfig, VQGANConfig
from adaptive_tokenizer.model import ALITModel
from adaptive_tokenizer.presets import (ALIT_SMALL, AUTHORS_SIZES, DEFAULT_BASE, DEFAULT_MODEL, authors_heads,
                                        default_model, get_preset, list_presets)


def test_list_presets_names_every_preset_sorted():
    assert list_presets() == ["alit_small", "default"]
    assert adaptive_tokenizer.list_presets is list_presets and adaptive_tokenizer.get_preset is get_preset


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_is_a_valid_architecture_that_builds(name):
    preset = get_preset(name)
    assert isinstance(preset, ModelConfig)
    assert ModelConfig.from_dict(preset.to_dict()) == preset
    ALITModel(preset.replace(encoder_layers=1, decoder_layers=1))  # sizes fit together (fewer layers: fast)


def test_unknown_name_is_a_value_error_listing_the_names():
    with pytest.raises(ValueError, match=r"unknown preset 'alit_huge'; choose from \['alit_small', 'default'\]"):
        get_preset("alit_huge")


def test_default_is_the_embedded_default_models_architecture():
    assert get_preset("default") is DEFAULT_MODEL and DEFAULT_MODEL.base is DEFAULT_BASE
    assert (DEFAULT_MODEL.image_size, DEFAULT_MODEL.grid_size, DEFAULT_MODEL.encoder_width) == (128, 16, 256)
    assert DEFAULT_MODEL.rollout == "cached" and not DEFAULT_MODEL.dynamic_halting
    assert (DEFAULT_BASE.norm_groups, DEFAULT_BASE.shortcut) == (8, "input")
    # the names from before the registry still resolve to the same objects
    assert config.DEFAULT_MODEL is DEFAULT_MODEL and config.DEFAULT_BASE is DEFAULT_BASE
    with pytest.raises(AttributeError):
        config.NO_SUCH_NAME  # noqa: B018


def test_default_model_fits_the_default_architecture_around_another_base():
    assert default_model() == DEFAULT_MODEL
    base = VQGANConfig(ch=32, ch_mult=(1, 2), z_channels=64, codebook_dim=64, resolution=32, norm_groups=8)
    fitted = default_model(base)
    assert fitted.base == base and (fitted.image_size, fitted.patch_size) == (32, 2)
    assert fitted.replace(base=DEFAULT_BASE, image_size=128, patch_size=8) == DEFAULT_MODEL


def test_alit_small_is_the_authors_size_on_their_vqgan():
    assert get_preset("alit_small") is ALIT_SMALL
    assert ALIT_SMALL.base == VQGANConfig()  # the VQGANConfig defaults are the authors' VQGAN
    width, layers, heads = AUTHORS_SIZES["alit_small"]
    assert (ALIT_SMALL.encoder_width, ALIT_SMALL.encoder_layers, ALIT_SMALL.encoder_heads) == (width, layers, heads)
    assert (ALIT_SMALL.decoder_width, ALIT_SMALL.decoder_layers, ALIT_SMALL.decoder_heads) == (width, layers, heads)
    assert (ALIT_SMALL.image_size, ALIT_SMALL.max_tokens) == (256, 256) and not ALIT_SMALL.dynamic_halting


def test_authors_heads_come_from_their_sizes():
    assert [authors_heads(w, n) for w, n, _ in AUTHORS_SIZES.values()] == [h for _, _, h in AUTHORS_SIZES.values()]
    assert authors_heads(512, 8) == 8 and authors_heads(768, 12) == 12 and authors_heads(1024, 16) == 16
    assert authors_heads(64, 2) is None
    assert presets.__doc__ and "list_presets" in presets.__doc__
