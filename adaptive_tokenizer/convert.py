"""Convert the authors' ALIT checkpoints (``torch.save({'ema': state_dict})``) to ``config.json`` + safetensors.

Every key of the checkpoint is either mapped onto a parameter of :class:`ALITModel`, or dropped because it is
training-only (``gan_losses.*``: LPIPS networks and discriminators). Anything else, and any parameter left
without a value, is an error that names the keys. Sizes are inferred from tensor shapes; the attention head
counts cannot be, so they default to the authors' presets (``presets.AUTHORS_SIZES``) and can be given explicitly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from .errors import InputError
from .config import ModelConfig, VQGANConfig
from .presets import authors_heads
from .serialization import expected_shapes, save_model_files

TRAINING_ONLY_PREFIXES = ("gan_losses.",)

# Transformer blocks (encoder and decoder alike): the authors' sublayer prefix -> ours.
_BLOCK_SUBLAYERS = {"ln_1.": "norm1.", "ln_2.": "norm2.", "attn.in_proj_": "attn.qkv.", "attn.out_proj.": "attn.proj.",
                    "mlp.c_fc.": "mlp.fc.", "mlp.c_proj.": "mlp.proj."}
_SUBLAYER = "|".join(map(re.escape, _BLOCK_SUBLAYERS))


def _block_key(match: re.Match[str]) -> str:
    side, block, sublayer, tensor = match.groups()
    return f"{side}.transformer.blocks.{block}.{_BLOCK_SUBLAYERS[sublayer]}{tensor}"


# (authors' key regex, our key template or a function of the match), grouped by the part of ALITModel they fill;
# applied in order, first match wins.
_KeyRule = tuple[str, str | Callable[[re.Match[str]], str]]
_BASE_RULES: list[_KeyRule] = [  # the VQGAN keeps its layout, but for its codebook and 1x1 shortcut convs
    (r"base_tokenizer\.vqgan\.quantize\.embedding\.weight", "base.codebook"),
    (r"base_tokenizer\.vqgan\.(encoder|decoder)\.(.*)\.nin_shortcut\.weight", r"base.\1.\2.shortcut.weight"),
    (r"base_tokenizer\.vqgan\.(encoder|decoder)\.(.*)", r"base.\1.\2"),
]
_TRANSFORMER_RULES: list[_KeyRule] = [  # what encoder and decoder share: blocks, "<side>_<name>" -> "<side>.<name>"
    (rf"(encoder|decoder)\.transformer\.(\d+)\.({_SUBLAYER})(weight|bias)", _block_key),
    (r"(encoder|decoder)_(class_embedding|positional_embedding|mask_token)", r"\1.\2"),
]
_ENCODER_RULES: list[_KeyRule] = [
    (r"patch_embed\.(weight|bias)", r"encoder.patch_embed.\1"),
    (r"latent_tokens", "encoder.latent_tokens"),
    (r"latent_token_positional_embedding", "encoder.latent_positional_embedding"),
    (r"timestep_embedding", "encoder.iteration_embedding"),
    (r"encoder_ln_(pre|post|recursive)\.(weight|bias)", r"encoder.norm_\1.\2"),
    (r"pre_quantizer_mlp\.(weight|bias)", r"encoder.to_token.\1"),
]
_DECODER_RULES: list[_KeyRule] = [
    (r"decoder\.decoder_embed\.(weight|bias)", r"decoder.latent_embed.\1"),
    (r"decoder\.latent_token_positional_embedding", "decoder.latent_positional_embedding"),
    (r"decoder\.ln_(pre|post)\.(weight|bias)", r"decoder.norm_\1.\2"),
    (r"decoder\.ffn\.(0|2)\.(weight|bias)", r"decoder.head.\1.\2"),
]
_KEY_RULES: list[_KeyRule] = [*_BASE_RULES, *_TRANSFORMER_RULES, *_ENCODER_RULES,
                             (r"quantize\.embedding\.weight", "quantizer.codebook"), *_DECODER_RULES]


class ConversionError(InputError):
    """The checkpoint does not match the ALIT architecture (the message names the keys)."""


def map_key(key: str) -> str | None:
    """Authors' state-dict key -> our key, or None when no rule applies."""
    for pattern, template in _KEY_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    return None


def load_authors_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read ``{'ema': state_dict}`` (or a bare state dict) without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal or corrupt file
        raise ConversionError(f"cannot read {path} as a weights-only torch checkpoint: {err}") from None
    if isinstance(checkpoint, Mapping) and "ema" in checkpoint:
        checkpoint = checkpoint["ema"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ConversionError(f"{path} holds no state dict: expected {{'ema': state_dict}} or a state dict")
    return dict(checkpoint)


def infer_config(state_dict: Mapping[str, Tensor], *, encoder_heads: int | None = None,
                 decoder_heads: int | None = None, dynamic_halting: bool = True,
                 dynamic_halting_confidence: float = 0.55) -> ModelConfig:
    """Infer every size of the model from the authors' tensor shapes."""
    sd = state_dict

    def need(key: str) -> Tensor:
        if key not in sd:
            raise ConversionError(f"checkpoint lacks {key!r}, which an ALIT VQGAN checkpoint always has")
        return sd[key]

    vq = "base_tokenizer.vqgan."
    ch = need(vq + "encoder.conv_in.weight").shape[0]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(re.escape(vq) + r"encoder\.down\.(\d+)\.", k))})
    ch_mult = tuple(need(vq + f"encoder.down.{level}.block.0.conv1.weight").shape[0] // ch for level in levels)
    num_res_blocks = len({k.split(".")[6] for k in sd if k.startswith(vq + "encoder.down.0.block.")})
    z_channels = need(vq + "encoder.conv_out.weight").shape[0]
    codebook = need(vq + "quantize.embedding.weight")
    grid_tokens = need("encoder_positional_embedding").shape[0] - 1
    grid = int(round(grid_tokens**0.5))
    patch_size = need("patch_embed.weight").shape[-1]
    image_size = grid * patch_size
    attn_levels = {int(m.group(1)) for k in sd if (m := re.match(re.escape(vq) + r"encoder\.down\.(\d+)\.attn\.", k))}
    attn_resolutions = tuple(sorted({image_size // 2**level for level in attn_levels}, reverse=True))
    base = VQGANConfig(
        in_channels=need(vq + "encoder.conv_in.weight").shape[1],
        out_channels=need(vq + "decoder.conv_out.weight").shape[0],
        ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
        z_channels=z_channels, codebook_size=codebook.shape[0], codebook_dim=codebook.shape[1],
        resolution=image_size)

    def layers(prefix: str) -> int:
        return len({int(m.group(1)) for k in sd if (m := re.match(prefix + r"\.transformer\.(\d+)\.", k))})

    encoder_width = need("encoder_ln_pre.weight").shape[0]
    decoder_width = need("decoder.ln_pre.weight").shape[0]
    encoder_layers, decoder_layers = layers("encoder"), layers("decoder")

    def heads(given: int | None, width: int, depth: int, side: str) -> int:
        if given is not None:
            return given
        if (preset := authors_heads(width, depth)) is not None:
            return preset
        raise ConversionError(f"cannot infer the {side} head count from shapes (width {width}, {depth} layers "
                              f"matches no authors' preset); pass --{side}-heads")

    quantized = "quantize.embedding.weight" in sd
    factorized = "pre_quantizer_mlp.weight" in sd
    latent_tokens = need("latent_tokens")
    return ModelConfig(
        base=base, image_size=image_size, patch_size=patch_size,
        encoder_width=encoder_width, encoder_layers=encoder_layers,
        encoder_heads=heads(encoder_heads, encoder_width, encoder_layers, "encoder"),
        decoder_width=decoder_width, decoder_layers=decoder_layers,
        decoder_heads=heads(decoder_heads, decoder_width, decoder_layers, "decoder"),
        mlp_ratio=need("encoder.transformer.0.mlp.c_fc.weight").shape[0] / encoder_width,
        latent_kind="quantized" if quantized else "continuous", factorize_latent=factorized,
        token_dim=sd["pre_quantizer_mlp.weight"].shape[0] if factorized else encoder_width,
        codebook_size=sd["quantize.embedding.weight"].shape[0] if quantized else ModelConfig.codebook_size,
        tokens_per_iteration=latent_tokens.shape[0],
        max_iterations=need("timestep_embedding").shape[0],
        decoder_max_latent_tokens=need("decoder.latent_token_positional_embedding").shape[0],
        dynamic_halting=dynamic_halting, dynamic_halting_confidence=dynamic_halting_confidence,
        rollout="recurrent")


def convert_state_dict(state_dict: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Rename and reshape the authors' tensors into our state dict; strict in both directions."""
    expected = expected_shapes(config)
    converted: dict[str, Tensor] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        if key.startswith(TRAINING_ONLY_PREFIXES):
            continue
        ours = map_key(key)
        if ours is None or ours not in expected:
            unmapped.append(key)
            continue
        shape = expected[ours]
        if tensor.numel() != shape.numel():
            raise ConversionError(f"{key}: shape {tuple(tensor.shape)} does not fit {ours} {tuple(shape)}")
        converted[ours] = tensor.detach().reshape(shape).to(torch.float32).contiguous()
    if unmapped:
        raise ConversionError(f"checkpoint keys with no place in the model: {sorted(unmapped)}")
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ConversionError(f"model parameters missing from the checkpoint: {missing}")
    return converted


def convert_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                       encoder_heads: int | None = None, decoder_heads: int | None = None,
                       dynamic_halting: bool = True, dynamic_halting_confidence: float = 0.55) -> ModelConfig:
    """Convert an authors' ``.pth`` into ``out_dir/config.json`` + ``out_dir/model.safetensors``."""
    state_dict = load_authors_checkpoint(checkpoint)
    config = infer_config(state_dict, encoder_heads=encoder_heads, decoder_heads=decoder_heads,
                          dynamic_halting=dynamic_halting, dynamic_halting_confidence=dynamic_halting_confidence)
    weights = convert_state_dict(state_dict, config)
    save_model_files(out_dir, config, weights)
    return config
