"""The package's files (``serialization.py``): model folders (config.json + model.safetensors, checked against the
shapes the config implies) and token files; nothing is unpickled, every write is atomic."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptive_tokenizer import serialization
from adaptive_tokenizer.config import ModelConfig
from adaptive_tokenizer.model import ALITModel
from adaptive_tokenizer.serialization import (TOKEN_FORMAT, check_weights, expected_shapes, load_model_files,
                                              load_token_file, save_model_files, save_token_file)
from adaptive_tokenizer.tokenizer import EncodeResult


# ---- model folders -------------------------------------------------------------------------------------------
def test_expected_shapes_are_the_models_state_dict(converted_dirs):
    config, weights = load_model_files(converted_dirs["A"])
    shapes = expected_shapes(config)
    assert shapes == {key: value.shape for key, value in ALITModel(config).state_dict().items()}
    assert shapes == {key: value.shape for key, value in weights.items()}


def test_model_files_round_trip_in_float32(converted_dirs, tmp_path):
    config, weights = load_model_files(converted_dirs["B"])
    assert isinstance(config, ModelConfig) and all(v.dtype == torch.float32 for v in weights.values())
    save_model_files(tmp_path / "new" / "model", config, {k: v.half() for k, v in weights.items()})  # compact
    assert sorted(os.listdir(tmp_path / "new" / "model")) == ["config.json", "model.safetensors"]
    assert load_file(tmp_path / "new" / "model" / "model.safetensors")["decoder.mask_token"].dtype == torch.float16
    again, loaded = load_model_files(tmp_path / "new" / "model")
    assert again == config and all(v.dtype == torch.float32 for v in loaded.values())
    torch.testing.assert_close(loaded, {k: v.half().float() for k, v in weights.items()}, rtol=0, atol=0)


def test_check_weights_names_every_problem(converted_dirs):
    config, weights = load_model_files(converted_dirs["A"])
    check_weights(config, weights, "fine")
    broken = dict(weights)
    del broken["quantizer.codebook"]
    broken["extra.weight"] = torch.zeros(2)
    broken["decoder.mask_token"] = torch.zeros(3)
    broken["decoder.norm_pre.weight"] = torch.full_like(weights["decoder.norm_pre.weight"], float("inf"))
    with pytest.raises(ValueError) as error:
        check_weights(config, broken, "these weights")
    message = str(error.value)
    assert message.startswith("these weights does not match its config: ")
    for part in ("missing ['quantizer.codebook']", "unexpected ['extra.weight']", "decoder.mask_token: (3,) != ",
                 "NaN or infinite values in ['decoder.norm_pre.weight']"):
        assert part in message


def test_save_model_files_refuses_weights_that_do_not_fit_and_writes_nothing(converted_dirs, tmp_path):
    config, weights = load_model_files(converted_dirs["A"])
    del weights["quantizer.codebook"]
    with pytest.raises(ValueError, match="weights to save does not match its config: missing"):
        save_model_files(tmp_path / "out", config, weights)
    assert not (tmp_path / "out").exists()


def test_load_model_files_names_what_is_missing_or_unreadable(converted_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json; a model directory holds config.json and "
                                                "model.safetensors"):
        load_model_files(tmp_path)
    (tmp_path / "config.json").write_bytes((converted_dirs["A"] / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="cannot read .* as safetensors"):
        load_model_files(tmp_path)


# ---- token files ---------------------------------------------------------------------------------------------
def test_token_file_round_trip_quantized(tmp_path):
    tokens = [torch.arange(32), torch.arange(64) % 7]
    result = EncodeResult(tokens, torch.tensor([32, 64]), predicted_errors=torch.tensor([0.1, 0.2]))
    save_token_file(tmp_path / "sub" / "t.safetensors", result, ["a.png", "b.png"], "quantized")  # parents made
    loaded, sources = load_token_file(tmp_path / "sub" / "t.safetensors")
    assert sources == ["a.png", "b.png"] and all(torch.equal(a, b) for a, b in zip(loaded, tokens))
    raw = load_file(tmp_path / "sub" / "t.safetensors")
    assert set(raw) == {"tokens", "num_tokens", "predicted_errors"} and raw["tokens"].dtype == torch.int64


def test_token_file_round_trip_continuous(tmp_path):
    tokens = [torch.randn(32, 12), torch.randn(96, 12)]
    result = EncodeResult(tokens, torch.tensor([32, 96]), torch.tensor([0.1, 0.2]))
    save_token_file(tmp_path / "t.safetensors", result, ["a/x.png", "y.jpg"], "continuous")
    loaded, sources = load_token_file(tmp_path / "t.safetensors")
    assert sources == ["a/x.png", "y.jpg"] and all(torch.equal(a, b) for a, b in zip(loaded, tokens))


@pytest.mark.parametrize("tokens, sources, latent_kind, message", [
    ([torch.zeros(32, dtype=torch.long)], ["a.png"], "discrete", "latent_kind is 'quantized' or 'continuous'"),
    ([torch.zeros(32, 12)], ["a.png"], "quantized", "quantized token sequence of 1 dims"),
    ([torch.zeros(32, dtype=torch.long)], ["a.png", "b.png"], "quantized", "2 sources for 1 token sequences"),
])
def test_save_token_file_rejects(tmp_path, tokens, sources, latent_kind, message):
    result = EncodeResult(tokens, torch.tensor([len(t) for t in tokens]))
    with pytest.raises(ValueError, match=message):
        save_token_file(tmp_path / "t.safetensors", result, sources, latent_kind)
    assert not list(tmp_path.iterdir())


def test_save_token_file_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"previous")
    result = EncodeResult([torch.zeros(32, dtype=torch.long)], torch.tensor([32]))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_token_file(path, result, ["x.png"], "quantized")
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["t.safetensors"]


@pytest.mark.parametrize("tensors, metadata, message", [
    ({"tokens": torch.zeros(64, dtype=torch.long), "num_tokens": torch.tensor([32])}, None, "sums to 32"),
    ({"tokens": torch.zeros(32, dtype=torch.long)}, None, "lacks tensors ['num_tokens']"),
    ({"tokens": torch.zeros(32, 12), "num_tokens": torch.tensor([32])}, None, "must have 1 dims"),
    ({"tokens": torch.zeros(32, dtype=torch.long), "num_tokens": torch.tensor([32.0])}, None, "int64"),
    ({"tokens": torch.zeros(32, dtype=torch.long), "num_tokens": torch.tensor([32])}, {"sources": "[]"}, "sources"),
    ({"tokens": torch.zeros(32, dtype=torch.long), "num_tokens": torch.tensor([32])}, {"format": "x/1"}, "not a token"),
    ({"tokens": torch.zeros(32, dtype=torch.long), "num_tokens": torch.tensor([32])}, {"latent_kind": "x"},
     "latent_kind metadata is 'x'"),
    ({"tokens": torch.zeros(0, dtype=torch.long), "num_tokens": torch.zeros(0, dtype=torch.long)}, None, "no images"),
])
def test_load_token_file_rejects(tmp_path, tensors, metadata, message):
    meta = {"format": TOKEN_FORMAT, "latent_kind": "quantized", "sources": '["a.png"]', **(metadata or {})}
    save_file(tensors, tmp_path / "t.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_token_file(tmp_path / "t.safetensors")


def test_load_token_file_missing_or_not_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="token file not found"):
        load_token_file(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="cannot read .* as a safetensors token file"):
        load_token_file(tmp_path / "bad.safetensors")


def test_negative_num_tokens_is_named(tmp_path):
    save_file({"tokens": torch.zeros(32, dtype=torch.long), "num_tokens": torch.tensor([64, -32])},
              tmp_path / "t.safetensors", metadata={"format": TOKEN_FORMAT, "latent_kind": "quantized",
                                                    "sources": json.dumps(["a.png", "b.png"])})
    with pytest.raises(ValueError, match="non-negative lengths, got -32 for image 1"):
        load_token_file(tmp_path / "t.safetensors")
