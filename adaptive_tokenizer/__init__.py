"""adaptive-tokenizer: images <-> a variable number of discrete tokens (ALIT, ICLR 2025)."""

from .config import ModelConfig, VQGANConfig
from .convert import convert_checkpoint
from .hub import ChecksumError, ModelInfo, ModelNotFoundError, list_pretrained
from .tokenizer import AdaptiveTokenizer, EncodeResult

__all__ = ["AdaptiveTokenizer", "ChecksumError", "EncodeResult", "ModelConfig", "ModelInfo", "ModelNotFoundError",
           "VQGANConfig", "convert_checkpoint", "list_pretrained"]
__version__ = "0.1.0"
