"""Architecture presets: the one registry of named model architectures.

``list_presets()`` names them; ``get_preset(name)`` returns the :class:`~adaptive_tokenizer.config.ModelConfig`
(a ValueError listing the names for any other name). A preset is an architecture only (random weights when built);
trained models are loaded by name with ``AdaptiveTokenizer.from_pretrained`` (``list_pretrained()``).

- ``default``: the embedded default model's architecture (what ``training/`` trains): 128 px photos, an f8 VQGAN
  with 1024 codes (16x16 grid; 8 GroupNorm groups and shortcuts that read their input, not the authors' 32 /
  ``"branch"``), width-256 transformers with 4 + 4 layers, 32 tokens x 1..8 iterations, 4096 codes, cached
  rollout, no dynamic halting (not trained with it). :func:`default_model` fits it around another base tokenizer.
- ``alit_small``: the authors' alit_small (their VQGAN, the ``VQGANConfig`` defaults; 256 px; width 1024, 8 + 8
  layers, 8 heads), without dynamic halting.

``AUTHORS_SIZES`` holds the transformer sizes of the authors' presets; conversion reads their head counts from it
(:func:`authors_heads`), since a checkpoint's shapes do not show them.
"""

from __future__ import annotations

from .errors import InputError
from .config import ModelConfig, VQGANConfig

# The authors' presets: name -> (width, layers, heads), the same for encoder and decoder.
AUTHORS_SIZES: dict[str, tuple[int, int, int]] = {
    "alit_tiny": (512, 8, 8), "alit_small": (1024, 8, 8), "alit_base": (768, 12, 12), "alit_semilarge": (1024, 16, 16),
}

DEFAULT_BASE = VQGANConfig(ch=32, ch_mult=(1, 1, 2, 4), num_res_blocks=2, attn_resolutions=(), z_channels=64,
                           codebook_size=1024, codebook_dim=64, resolution=128, norm_groups=8, shortcut="input")
DEFAULT_MODEL = ModelConfig(base=DEFAULT_BASE, image_size=128, patch_size=8, encoder_width=256, encoder_layers=4,
                            encoder_heads=8, decoder_width=256, decoder_layers=4, decoder_heads=8, mlp_ratio=4.0,
                            latent_kind="quantized", factorize_latent=True, token_dim=12, codebook_size=4096,
                            tokens_per_iteration=32, max_iterations=8, decoder_max_latent_tokens=256,
                            dynamic_halting=False, rollout="cached")


def _authors_model(name: str) -> ModelConfig:
    width, layers, heads = AUTHORS_SIZES[name]
    return ModelConfig(base=VQGANConfig(), image_size=256, patch_size=16, encoder_width=width, encoder_layers=layers,
                       encoder_heads=heads, decoder_width=width, decoder_layers=layers, decoder_heads=heads,
                       dynamic_halting=False)


ALIT_SMALL = _authors_model("alit_small")

_PRESETS: dict[str, ModelConfig] = {"alit_small": ALIT_SMALL, "default": DEFAULT_MODEL}


def list_presets() -> list[str]:
    """The preset names, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """The architecture named ``name``; ValueError listing the preset names for any other."""
    if name not in _PRESETS:
        raise InputError(f"unknown preset {name!r}; choose from {list_presets()}")
    return _PRESETS[name]


def default_model(base: VQGANConfig = DEFAULT_BASE) -> ModelConfig:
    """The default architecture around the base tokenizer ``base``: image size and patch size follow its resolution
    and downsampling (``default_model()`` is ``DEFAULT_MODEL``)."""
    return DEFAULT_MODEL.replace(base=base, image_size=base.resolution, patch_size=base.downsample_factor)


def authors_heads(width: int, layers: int) -> int | None:
    """Head count of the authors' preset with transformers of ``width`` and ``layers``, None when none has them."""
    heads = {(w, n): h for w, n, h in AUTHORS_SIZES.values()}
    return heads.get((width, layers))
