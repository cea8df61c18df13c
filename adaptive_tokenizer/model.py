"""The ALIT network: base tokenizer + latent-distillation encoder/decoder + optional latent quantizer.

This module only holds weights and the per-stage computations; the iteration loop (rollout, halting,
length choice) lives in ``rollout.py`` and the user-facing API in ``tokenizer.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base_tokenizer import VQGAN
from .config import ModelConfig
from .latent_model import LatentDecoder, LatentEncoder
from .length_predictor import LengthPredictor
from .metrics import l1_error
from .quantizer import LatentQuantizer


def base_reconstruction(base: VQGAN, pixels: Tensor, *, features: Tensor | None = None,
                        code_ids: Tensor | None = None, clamp: bool = True) -> Tensor:
    """The base tokenizer's own reconstruction of ``pixels`` ``[N, 3, R, R]``: encode, nearest codes, ``decode_ids``;
    float32, clamped to [0, 1] unless ``clamp`` is False (the ceiling of every token budget). ``features``
    (``base.encode(pixels)``) or ``code_ids`` skip the steps a caller has already run."""
    if code_ids is None:
        code_ids = base.code_ids(base.encode(pixels) if features is None else features)
    reconstruction = base.decode_ids(code_ids).float()
    return reconstruction.clamp(0, 1) if clamp else reconstruction


def base_reconstruction_error(base: VQGAN, pixels: Tensor, *, features: Tensor | None = None,
                              code_ids: Tensor | None = None, clamp: bool = True) -> Tensor:
    """Mean absolute error ``[N]`` (float64, :func:`~adaptive_tokenizer.metrics.l1_error`) of
    :func:`base_reconstruction` against ``pixels``."""
    reconstruction = base_reconstruction(base, pixels, features=features, code_ids=code_ids, clamp=clamp)
    return l1_error(reconstruction, pixels)


class ALITModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.base = VQGAN(config.base)
        self.encoder = LatentEncoder(config)
        self.quantizer = LatentQuantizer(config.codebook_size, config.token_dim) if config.quantized else None
        self.decoder = LatentDecoder(config)
        self.length_predictor = LengthPredictor(config) if config.length_predictor is not None else None

    def decoder_inputs(self, tokens: Tensor) -> Tensor:
        """Tokens -> what the decoder reads: code vectors for ids ``[N, L]``, or the vectors ``[N, L, D]``."""
        if self.quantizer is not None:
            return self.quantizer.lookup(tokens).to(self.decoder.norm_pre.weight.dtype)
        return tokens.to(self.decoder.norm_pre.weight.dtype)

    def reconstruct(self, logits: Tensor) -> Tensor:
        """Decoder logits ``[N, G2, K]`` -> pixels ``[N, 3, R, R]`` (unclamped) via the expected base code."""
        probs = torch.softmax(logits.float(), dim=-1)
        features = probs @ self.base.codebook.float()
        return self.base.decode_features(features.to(self.base.codebook.dtype))

    def base_error(self, pixels: Tensor, code_ids: Tensor) -> Tensor:
        """Mean absolute error ``[N]`` of the base tokenizer's own reconstruction of ``pixels`` ``[N, 3, R, R]``
        from its codes ``code_ids`` ``[N, G2]`` (unclamped, as rollout errors; float32): the floor of any token
        budget."""
        return base_reconstruction_error(self.base, pixels, code_ids=code_ids, clamp=False).float()

    def num_parameters(self) -> dict[str, int]:
        parts = {"base_tokenizer": self.base, "encoder": self.encoder, "decoder": self.decoder}
        if self.quantizer is not None:
            parts["quantizer"] = self.quantizer
        if self.length_predictor is not None:
            parts["length_predictor"] = self.length_predictor
        counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
        counts["total"] = sum(counts.values())
        return counts

