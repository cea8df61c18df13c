"""adaptive-tokenizer: images <-> a variable number of discrete tokens (ALIT, ICLR 2025)."""

from .config import ModelConfig, VQGANConfig
from .convert import convert_checkpoint
from .tokenizer import AdaptiveTokenizer, EncodeResult

__all__ = ["AdaptiveTokenizer", "EncodeResult", "ModelConfig", "VQGANConfig", "convert_checkpoint"]
__version__ = "0.1.0"
