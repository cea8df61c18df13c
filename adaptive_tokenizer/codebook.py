"""Codebook lookup: squared-L2 distances to every code and the nearest code, in one place.

Every nearest-code search of the package and of ``training/`` goes through these two functions: the base
tokenizer's grid codes (``VQGAN.code_ids``), the latent quantizer (``LatentQuantizer.quantize``), the length
predictor's codebook-fit feature, and the training-time quantizers of ``training/vq.py`` and
``training/distill.py``. Distances are computed in float32 as ``|z|^2 + |e|^2 - 2 z.e`` (the authors' formula),
not as ``|z - e|^2``: the two round differently, and near-ties must resolve as the authors' code resolves them.
"""

from __future__ import annotations

from torch import Tensor


def squared_distances(vectors: Tensor, codebook: Tensor) -> Tensor:
    """Squared L2 distance of each vector ``[..., D]`` to each code of ``codebook`` ``[K, D]``: ``[..., K]`` float32.

    Both inputs are cast to float32 first (a no-op for float32 tensors).
    """
    vectors, codebook = vectors.float(), codebook.float()
    return vectors.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(-1) - 2 * vectors @ codebook.t()


def nearest_code(vectors: Tensor, codebook: Tensor) -> Tensor:
    """Id of the nearest code (:func:`squared_distances`) of each vector ``[..., D]``: ``[...]`` int64. On a tie the
    lowest id wins (``argmin``)."""
    return squared_distances(vectors, codebook).argmin(dim=-1)
