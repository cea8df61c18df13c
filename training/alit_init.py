"""The starting weights of the ALIT model that ``python -m training.distill`` trains: a fresh initialisation
(``--init-scheme``: the library creates the trainable parts as zeros, :func:`init_alit_weights` fills them by one
of :data:`INIT_SCHEMES`) or an exported model's (``--init``: :func:`start_from`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_tokenizer.model import ALITModel
from adaptive_tokenizer.serialization import load_model_files

from .loop import IncompatibleRun

MAE_WAVELENGTHS = (2 * math.pi, 2 * math.pi * 1e4)  # in grid cells: MAE's frequencies 1 / 10000**(i / quarter)


def sincos_2d(grid_size: int, width: int, wavelengths: tuple[float, float] = MAE_WAVELENGTHS) -> Tensor:
    """2D sine-cosine position codes ``[grid_size**2, width]`` (row-major), half the width per axis, with
    ``width // 4`` wavelengths (in grid cells) spaced geometrically over ``wavelengths`` (default: MAE's)."""
    quarter = width // 4
    steps = torch.arange(quarter, dtype=torch.float64) / quarter
    frequencies = 2 * math.pi / (wavelengths[0] * (wavelengths[1] / wavelengths[0]) ** steps)
    coords = torch.arange(grid_size, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (ys.flatten(), xs.flatten()):
        angles = axis[:, None] * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    codes = torch.cat(parts, dim=1)
    return F.pad(codes, (0, width - codes.shape[1])).float()


def latent_grid_positions(grid_size: int, tokens_per_iteration: int, iterations: int) -> Tensor:
    """Grid cell (row-major index) assigned to each latent token, ``[iterations, tokens_per_iteration]``.

    Iteration 0's tokens sit on a regular sub-grid (e.g. 4x8 for 32 tokens on 16x16); iteration t shifts that
    sub-grid by its t-th offset inside one sub-grid cell, so when iterations x tokens equals the grid size (8 x 32
    = 256) every cell is covered exactly once, coarse to fine."""
    rows = max(1, int(tokens_per_iteration**0.5))
    while tokens_per_iteration % rows:
        rows -= 1
    cols = tokens_per_iteration // rows
    cell_h, cell_w = max(1, grid_size // rows), max(1, grid_size // cols)
    offsets = [(dy, dx) for dy in range(cell_h) for dx in range(cell_w)]
    positions = torch.empty(iterations, tokens_per_iteration, dtype=torch.long)
    for t in range(iterations):
        dy, dx = offsets[t % len(offsets)]
        r = torch.arange(rows).repeat_interleave(cols) * cell_h + dy
        c = torch.arange(cols).repeat(rows) * cell_w + dx
        positions[t] = r.clamp(max=grid_size - 1) * grid_size + c.clamp(max=grid_size - 1)
    return positions


INIT_SCHEMES = ("small", "xavier-sincos", "local")


def init_alit_weights(model: ALITModel, seed: int = 0, scheme: str = "small", attention_gain: float = 8.0) -> None:
    """Fill the non-base parameters (the library creates them as zeros).

    ``small``: trunc-normal(0.02) Linear/Conv weights, N(0, 0.02) embeddings. ``xavier-sincos`` (MAE-style):
    xavier-uniform Linear/Conv weights and 2D sine-cosine codes as the initial (still learned) grid positions of
    encoder and decoder. ``local``: position-routed attention at step 0. Grid positions get sine-cosine codes in
    the first half of the width, latent tokens the code of one grid cell each (:func:`latent_grid_positions`) in
    the second half (encoder: latent embeddings; decoder: latent positions); every attention layer's query and
    key projections read those halves through one shared random matrix (``attention_gain`` x on the query), so
    that an encoder latent attends to the 2D tokens around its cell and a decoder grid query to the latents of
    its cell: the tokens carry local image content from the first step instead of one global average.
    All schemes: zero biases, unit LayerNorms, random unit vectors for the latent codebook."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}: use one of {', '.join(INIT_SCHEMES)}")
    gen = torch.Generator().manual_seed(seed)

    def trunc_normal(tensor: Tensor, std: float = 0.02) -> None:
        with torch.no_grad():
            values = torch.randn(tensor.shape, generator=gen) * std
            tensor.copy_(values.clamp(-2 * std, 2 * std))

    def xavier(weight: Tensor) -> None:
        fan_out, fan_in = weight.shape[0], weight[0].numel()
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        with torch.no_grad():
            weight.copy_((torch.rand(weight.shape, generator=gen) * 2 - 1) * bound)

    config = model.config
    for part in (model.encoder, model.decoder):
        for module in part.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                (trunc_normal if scheme == "small" else xavier)(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for name, param in part.named_parameters(recurse=False):
            trunc_normal(param)
        if scheme == "small":
            continue
        width = part.positional_embedding.shape[1]
        half = width // 2 if scheme == "local" else width
        grid_codes = torch.zeros(config.grid_size**2, width)
        # scaled like the unit-norm image tokens; ``local``: wavelengths of 2..2*grid cells, for locality
        wavelengths = (2.0, 2.0 * config.grid_size) if scheme == "local" else MAE_WAVELENGTHS
        grid_codes[:, :half] = sincos_2d(config.grid_size, half, wavelengths) * width**-0.5
        with torch.no_grad():
            part.positional_embedding[1:] = grid_codes
            if scheme != "local":
                continue
            cells = latent_grid_positions(config.grid_size, config.tokens_per_iteration, config.max_iterations)
            latent_codes = torch.zeros(config.max_iterations, config.tokens_per_iteration, width)
            latent_codes[..., half:] = grid_codes[cells][..., :half]
            if part is model.encoder:
                part.latent_tokens.zero_()
                part.latent_positional_embedding.zero_()
                part.iteration_embedding.copy_(latent_codes + part.iteration_embedding * 0.1)
                query_half, key_half = slice(half, width), slice(0, half)  # latents look up grid cells
            else:
                positions = latent_codes.flatten(0, 1)[: part.latent_positional_embedding.shape[0]]
                part.latent_positional_embedding[: len(positions)] = positions
                query_half, key_half = slice(0, half), slice(half, width)  # grid queries look up latents
            for block in part.transformer.blocks:
                q, k, _ = block.attn.qkv.weight.chunk(3)
                shared = q[:, query_half].clone()
                q.zero_()
                k.zero_()
                q[:, query_half] = attention_gain * shared
                k[:, key_half] = shared


def start_from(model: ALITModel, folder: str) -> None:
    """``--init``: the encoder/decoder/quantizer of an exported model with the same ALIT config, or with fewer
    encoder/decoder layers (a deeper ``--config``): the extra blocks are appended with their residual branches'
    output projections zeroed, so the grown model starts as exactly the exported one. The frozen base stays
    ``--base``'s, which may have another architecture (a warm start on a new base tokenizer); a length predictor is
    fitted after training (``adaptive-tokenizer fit-length-predictor``): not carried over."""
    init_config, init_weights = load_model_files(folder)
    same_depth = dict(encoder_layers=model.config.encoder_layers, decoder_layers=model.config.decoder_layers)
    if (init_config.replace(base=model.config.base, length_predictor=None, **same_depth) != model.config
            or init_config.encoder_layers > model.config.encoder_layers
            or init_config.decoder_layers > model.config.decoder_layers):
        raise IncompatibleRun(f"--init {folder}: its ALIT config differs from the model being trained (only more "
                              "encoder/decoder layers may be added)")
    loaded = model.load_state_dict({key: value for key, value in init_weights.items()
                                    if not key.startswith(("base.", "length_predictor."))}, strict=False)
    grown = [*new_blocks(model.encoder.transformer, init_config.encoder_layers, "encoder."),
             *new_blocks(model.decoder.transformer, init_config.decoder_layers, "decoder.")]
    for _, block in grown:
        zero_residual_outputs(block)
    grown_prefixes = tuple(prefix for prefix, _ in grown)
    if loaded.unexpected_keys or any(not key.startswith(("base.", *grown_prefixes)) for key in loaded.missing_keys):
        raise IncompatibleRun(f"--init {folder}: weights do not match its config ({loaded})")


def new_blocks(transformer: nn.Module, init_layers: int, owner: str) -> list[tuple[str, nn.Module]]:
    """The blocks of ``transformer`` beyond the first ``init_layers``, with their state-dict key prefixes."""
    return [(f"{owner}transformer.blocks.{i}.", block) for i, block in enumerate(transformer.blocks)
            if i >= init_layers]


@torch.no_grad()
def zero_residual_outputs(block: nn.Module) -> None:
    """Make a pre-norm transformer block the identity: both residual branches end in a zeroed projection (their
    inputs keep the default initialisation, so gradients reach them as soon as the projections move)."""
    for projection in (block.attn.proj, block.mlp.proj):
        projection.weight.zero_()
        projection.bias.zero_()
