"""adaptive-tokenizer: images <-> a variable number of discrete tokens (ALIT, ICLR 2025)."""

from importlib import metadata as _metadata

from .config import ModelConfig, VQGANConfig
from .convert import convert_checkpoint
from .errors import AdaptiveTokenizerError, InputError, InputTypeError, MissingExtraError
from .hub import ChecksumError, ModelInfo, ModelNotFoundError, list_pretrained
from .presets import get_preset, list_presets
from .tokenizer import AdaptiveTokenizer, EncodeResult

__all__ = ["AdaptiveTokenizer", "AdaptiveTokenizerError", "ChecksumError", "EncodeResult", "InputError",
           "InputTypeError", "MissingExtraError", "ModelConfig", "ModelInfo", "ModelNotFoundError", "VQGANConfig",
           "convert_checkpoint", "get_preset", "list_pretrained", "list_presets"]
try:
    __version__ = _metadata.version("adaptive-tokenizer")  # the installed distribution's version (pyproject.toml)
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"
