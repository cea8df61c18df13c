"""L2-normalised vector quantizer for the 1D latent tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LatentQuantizer(nn.Module):
    """Nearest-neighbour lookup in an l2-normalised codebook of ``codebook_size`` vectors of ``dim`` floats.

    Distances are squared L2 between l2-normalised vectors (computed in float32 as
    ``|z|^2 + |e|^2 - 2 z.e``, the authors' formula, so near-ties resolve the same way).
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
        codebook = self.normalized_codebook()
        distances = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        return distances.argmin(dim=1).view(vectors.shape[:-1])

    def lookup(self, ids: Tensor) -> Tensor:
        """``[...]`` int64 ids -> ``[..., dim]`` float32 l2-normalised code vectors (what the decoder reads)."""
        return F.embedding(ids, self.normalized_codebook())
