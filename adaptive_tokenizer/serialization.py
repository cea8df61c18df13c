"""The package's files: model folders and token files. Nothing here unpickles; every write is atomic
(:func:`~adaptive_tokenizer.io_utils.write_atomic`).

Model folders hold ``config.json`` (:class:`~adaptive_tokenizer.config.ModelConfig`) and ``model.safetensors``
(float32 or float16 tensors named as :class:`~adaptive_tokenizer.model.ALITModel`'s state dict); the file names are
``hub.CONFIG_NAME`` / ``hub.WEIGHTS_NAME``, which the manifest and Hub downloads use too. :func:`save_model_files`,
:func:`load_model_files`; :func:`check_weights` compares tensors with :func:`expected_shapes`, the parameter
shapes a config implies (also what conversion fills).

Token files (``adaptive-tokenizer encode``) are safetensors holding ``tokens`` (every image's sequence concatenated
along dim 0: int64 ``[sum L]`` for quantized models, float32 ``[sum L, D]`` for continuous ones), ``num_tokens``
(int64 ``[N]``) and, when a halt threshold was used, ``errors`` (float32 ``[N]``, the measured error of each chosen
length; rules ``exact``, ``search`` and ``verified``) and/or ``predicted_errors`` (the length predictor's estimate;
rules ``verified`` and ``predicted``). Their metadata holds ``format`` (:data:`TOKEN_FORMAT`), ``latent_kind`` and
``sources`` (a JSON list of the image paths). :func:`save_token_file`, :func:`load_token_file`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from .errors import InputError
from .config import ModelConfig
from .hub import CONFIG_NAME, WEIGHTS_NAME
from .io_utils import write_atomic
from .model import ALITModel

if TYPE_CHECKING:
    from .tokenizer import EncodeResult

TOKEN_FORMAT = "adaptive-tokenizer-tokens/1"
_TOKEN_DIMS = {"quantized": 1, "continuous": 2}


# ---- model folders -------------------------------------------------------------------------------------------
def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Name and shape of every tensor of a model of ``config`` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = ALITModel(config)
    return {key: value.shape for key, value in model.state_dict().items()}


def check_weights(config: ModelConfig, weights: dict[str, Tensor], source: str) -> None:
    """Raise ValueError naming every missing, unexpected, mis-shaped or non-finite tensor."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(f"{k}: {tuple(weights[k].shape)} != {tuple(s)}" for k, s in expected.items()
                   if k in weights and weights[k].shape != s)
    not_finite = sorted(k for k, v in weights.items()
                        if k in expected and v.is_floating_point() and not torch.isfinite(v).all())
    problems = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                f"wrong shapes {wrong}" if wrong else "", f"NaN or infinite values in {not_finite}" if not_finite else ""]
    problems = [p for p in problems if p]
    if problems:
        raise InputError(f"{source} does not match its config: " + "; ".join(problems))


def load_model_files(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Read ``config.json`` and ``model.safetensors`` from ``directory`` (no pickle involved); float32 tensors."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}; a model directory holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}")
    config = ModelConfig.from_json(directory / CONFIG_NAME)
    try:
        weights = load_file(directory / WEIGHTS_NAME)
    except (SafetensorError, OSError) as err:
        raise InputError(f"cannot read {directory / WEIGHTS_NAME} as safetensors: {err}") from None
    check_weights(config, weights, str(directory / WEIGHTS_NAME))
    return config, {k: v.float() for k, v in weights.items()}


def save_model_files(directory: str | os.PathLike, config: ModelConfig, weights: dict[str, Tensor]) -> None:
    """Write ``config.json`` + ``model.safetensors``; each file appears complete or not at all."""
    check_weights(config, weights, "weights to save")
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    contents = {WEIGHTS_NAME: save(tensors, metadata={"format": "pt"}),
                CONFIG_NAME: config.to_json_string().encode()}
    for name, data in contents.items():
        write_atomic(directory / name, data, parents=True)


# ---- token files ---------------------------------------------------------------------------------------------
def save_token_file(path: str | os.PathLike, result: EncodeResult, sources: Sequence[str], latent_kind: str) -> None:
    """Write ``result`` as a token file, atomically: the file appears complete or not at all."""
    dims = _TOKEN_DIMS.get(latent_kind)
    if dims is None or not len(result) or any(t.dim() != dims for t in result.tokens):
        raise InputError(f"save_token_file needs at least one {latent_kind} token sequence of {dims} dims "
                         "(latent_kind is 'quantized' or 'continuous')")
    if len(sources) != len(result):
        raise InputError(f"{len(sources)} sources for {len(result)} token sequences")
    dtype = torch.int64 if latent_kind == "quantized" else torch.float32
    tensors = {"tokens": torch.cat([t.to(dtype) for t in result.tokens]).contiguous(),
               "num_tokens": result.num_tokens.to(torch.int64).contiguous()}
    if result.errors is not None:
        tensors["errors"] = result.errors.to(torch.float32).contiguous()
    if result.predicted_errors is not None:
        tensors["predicted_errors"] = result.predicted_errors.to(torch.float32).contiguous()
    metadata = {"format": TOKEN_FORMAT, "latent_kind": latent_kind, "sources": json.dumps([str(s) for s in sources])}
    write_atomic(path, save(tensors, metadata=metadata), parents=True)


def load_token_file(path: str | os.PathLike) -> tuple[list[Tensor], list[str]]:
    """Read a token file: ``(per-image token tensors, source paths)``; ValueError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise InputError(f"cannot read {path} as a safetensors token file: {err}") from None
    if metadata.get("format") != TOKEN_FORMAT:
        raise InputError(f"{path} is not a token file: metadata format is {metadata.get('format')!r}, "
                         f"expected {TOKEN_FORMAT!r}")
    return _split_tokens(str(path), tensors, metadata)


def _split_tokens(where: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> tuple[list[Tensor], list[str]]:
    """Check the token file's tensors against each other and its metadata; split ``tokens`` per image."""
    missing = sorted({"tokens", "num_tokens"} - set(tensors))
    if missing:
        raise InputError(f"{where} lacks tensors {missing}")
    tokens, num_tokens = tensors["tokens"], tensors["num_tokens"]
    if num_tokens.numel() == 0:
        raise InputError(f"{where} holds no images")
    kind = metadata.get("latent_kind")
    expected_dims = _TOKEN_DIMS.get(kind)  # type: ignore[arg-type]
    if expected_dims is None:
        raise InputError(f"{where}: latent_kind metadata is {kind!r}, expected 'quantized' or 'continuous'")
    if tokens.dim() != expected_dims:
        raise InputError(f"{where}: {kind} tokens must have {expected_dims} dims, got shape {tuple(tokens.shape)}")
    if num_tokens.dim() != 1 or num_tokens.dtype != torch.int64:
        raise InputError(f"{where}: num_tokens must be a 1-D int64 tensor of lengths, got shape "
                         f"{tuple(num_tokens.shape)} dtype {num_tokens.dtype}")
    if (num_tokens < 0).any():
        first = int((num_tokens < 0).nonzero()[0])
        raise InputError(f"{where}: num_tokens must be non-negative lengths, got {int(num_tokens[first])} for "
                         f"image {first}")
    if int(num_tokens.sum()) != tokens.shape[0]:
        raise InputError(f"{where}: num_tokens sums to {int(num_tokens.sum())} but tokens holds {tokens.shape[0]}")
    try:
        sources = json.loads(metadata.get("sources", ""))
    except json.JSONDecodeError:
        sources = None
    if not isinstance(sources, list) or len(sources) != len(num_tokens) or not all(isinstance(s, str) for s in sources):
        raise InputError(f"{where}: sources metadata must be a JSON list of {len(num_tokens)} paths")
    return list(torch.split(tokens, num_tokens.tolist())), sources


def model_identity(model: ALITModel) -> tuple[dict[str, Any], bytes]:
    """``({"config", "weights_sha256"}, weights)``: the sha256 is that of ``weights``, the float32 state dict
    serialized as ``save_pretrained`` writes it (safetensors), so any copy of the same weights has the same hash
    (however the model was named or loaded)."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    weights = save(tensors, metadata={"format": "pt"})
    return {"config": model.config.to_dict(), "weights_sha256": hashlib.sha256(weights).hexdigest()}, weights
