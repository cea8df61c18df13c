"""L2-normalised vector quantizer for the 1D latent tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .codebook import nearest_code


class LatentQuantizer(nn.Module):
    """Nearest-neighbour lookup in an l2-normalised codebook of ``codebook_size`` vectors of ``dim`` floats.

    Distances are squared L2 between l2-normalised vectors (:func:`~adaptive_tokenizer.codebook.nearest_code`:
    float32, the authors' formula, so near-ties resolve the same way).
    """

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.codebook = nn.Parameter(torch.zeros(codebook_size, dim))

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    def normalized_codebook(self) -> Tensor:
        return F.normalize(self.codebook.float(), dim=-1)

    def quantize(self, vectors: Tensor) -> Tensor:
        """``[..., dim]`` float -> ``[...]`` int64 code ids."""
        flat = F.normalize(vectors.float().reshape(-1, vectors.shape[-1]), dim=-1)
        return nearest_code(flat, self.normalized_codebook()).view(vectors.shape[:-1])

    def lookup(self, ids: Tensor) -> Tensor:
        """``[...]`` int64 ids -> ``[..., dim]`` float32 l2-normalised code vectors (what the decoder reads)."""
        return F.embedding(ids, self.normalized_codebook())
