"""Converting the authors' checkpoints: strict key mapping, sizes from shapes, safe loading, atomic output."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from adaptive_tokenizer import ModelConfig, convert_checkpoint
from adaptive_tokenizer.convert import ConversionError, convert_state_dict, infer_config, load_authors_checkpoint, map_key

from .conftest import FIXTURES, TINY_HEADS


@pytest.fixture(scope="module")
def state_dict_a():
    return load_authors_checkpoint(FIXTURES / "alit_tiny_A.pth")


def test_sizes_are_inferred_from_shapes(state_dict_a):
    config = infer_config(state_dict_a, **TINY_HEADS)
    assert (config.image_size, config.patch_size, config.grid_size) == (256, 16, 16)
    assert (config.encoder_width, config.encoder_layers, config.decoder_width, config.decoder_layers) == (64, 2, 64, 2)
    assert (config.latent_kind, config.token_dim, config.codebook_size) == ("quantized", 12, 128)
    assert (config.tokens_per_iteration, config.max_iterations, config.max_tokens) == (32, 8, 256)
    assert config.mlp_ratio == 4.0 and config.decoder_max_latent_tokens == 256
    base = config.base
    assert (base.ch, base.ch_mult, base.num_res_blocks, base.z_channels) == (32, (2, 1, 1, 1, 1), 1, 32)
    assert (base.codebook_size, base.codebook_dim, base.attn_resolutions) == (64, 32, ())
    assert config.dynamic_halting and config.dynamic_halting_confidence == 0.55 and config.rollout == "recurrent"


def test_continuous_variant(tmp_path):
    config = convert_checkpoint(FIXTURES / "alit_tiny_B.pth", tmp_path, **TINY_HEADS)
    assert config.latent_kind == "continuous" and config.latent_dim == 12
    assert "quantizer.codebook" not in load_file(tmp_path / "model.safetensors")


def test_head_counts_need_a_flag_when_no_preset_matches(state_dict_a):
    with pytest.raises(ConversionError, match="--encoder-heads"):
        infer_config(state_dict_a)


def test_every_tensor_is_carried_over_and_training_keys_dropped(state_dict_a, tmp_path):
    assert any(k.startswith("gan_losses.") for k in state_dict_a)
    config = convert_checkpoint(FIXTURES / "alit_tiny_A.pth", tmp_path, **TINY_HEADS)
    weights = load_file(tmp_path / "model.safetensors")
    authors = {k: v for k, v in state_dict_a.items() if not k.startswith("gan_losses.")}
    assert len(weights) == len(authors) == 186
    for key, tensor in authors.items():
        assert torch.equal(weights[map_key(key)].flatten(), tensor.flatten()), key
    assert ModelConfig.from_json(tmp_path / "config.json") == config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("authors, ours", [
    ("base_tokenizer.vqgan.quantize.embedding.weight", "base.codebook"),
    ("base_tokenizer.vqgan.encoder.down.1.block.0.nin_shortcut.weight", "base.encoder.down.1.block.0.shortcut.weight"),
    ("base_tokenizer.vqgan.decoder.conv_out.bias", "base.decoder.conv_out.bias"),
    ("encoder.transformer.3.ln_1.weight", "encoder.transformer.blocks.3.norm1.weight"),
    ("decoder.transformer.0.ln_2.bias", "decoder.transformer.blocks.0.norm2.bias"),
    ("encoder.transformer.11.attn.in_proj_weight", "encoder.transformer.blocks.11.attn.qkv.weight"),
    ("decoder.transformer.2.attn.out_proj.bias", "decoder.transformer.blocks.2.attn.proj.bias"),
    ("encoder.transformer.0.mlp.c_fc.weight", "encoder.transformer.blocks.0.mlp.fc.weight"),
    ("decoder.transformer.7.mlp.c_proj.bias", "decoder.transformer.blocks.7.mlp.proj.bias"),
    ("encoder_mask_token", "encoder.mask_token"), ("decoder_positional_embedding", "decoder.positional_embedding"),
    ("latent_token_positional_embedding", "encoder.latent_positional_embedding"),
    ("decoder.latent_token_positional_embedding", "decoder.latent_positional_embedding"),
    ("timestep_embedding", "encoder.iteration_embedding"), ("encoder_ln_recursive.bias", "encoder.norm_recursive.bias"),
    ("quantize.embedding.weight", "quantizer.codebook"), ("decoder.ffn.2.weight", "decoder.head.2.weight"),
    ("encoder.transformer.1.ln_3.weight", None), ("decoder_ln_pre.weight", None), ("encoder.ln_pre.weight", None),
])
def test_map_key(authors, ours):
    assert map_key(authors) == ours


def test_unknown_and_missing_keys_are_named(state_dict_a):
    config = infer_config(state_dict_a, **TINY_HEADS)
    extra = dict(state_dict_a, **{"encoder.some_new_thing": torch.zeros(3)})
    with pytest.raises(ConversionError, match="encoder.some_new_thing"):
        convert_state_dict(extra, config)
    missing = {k: v for k, v in state_dict_a.items() if k != "decoder.ln_post.bias"}
    with pytest.raises(ConversionError, match="decoder.norm_post.bias"):
        convert_state_dict(missing, config)
    wrong = dict(state_dict_a, **{"latent_tokens": torch.zeros(31, 64)})
    with pytest.raises(ConversionError, match="latent_tokens"):
        convert_state_dict(wrong, config)


def test_flags_for_halting(tmp_path):
    config = convert_checkpoint(FIXTURES / "alit_tiny_A.pth", tmp_path, dynamic_halting=False,
                                dynamic_halting_confidence=0.3, **TINY_HEADS)
    assert json.loads((tmp_path / "config.json").read_text())["dynamic_halting"] is False
    assert config.dynamic_halting_confidence == 0.3


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"ema": _Payload()}, handle)
    with pytest.raises(ConversionError, match="weights-only"):
        convert_checkpoint(path, tmp_path / "out", **TINY_HEADS)
    assert not (tmp_path / "out").exists()


def test_not_a_state_dict(tmp_path):
    torch.save({"ema": [1, 2, 3]}, tmp_path / "list.pth")
    with pytest.raises(ConversionError, match="no state dict"):
        load_authors_checkpoint(tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError):
        load_authors_checkpoint(tmp_path / "missing.pth")
