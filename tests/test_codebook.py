"""Codebook lookup (``codebook.py``): the one nearest-code search of the package and of ``training/``."""

import torch
import torch.nn.functional as F

from adaptive_tokenizer.base_tokenizer import VQGAN
from adaptive_tokenizer.codebook import nearest_code, squared_distances
from adaptive_tokenizer.config import VQGANConfig
from adaptive_tokenizer.quantizer import LatentQuantizer


def test_distances_are_squared_l2_in_float32():
    generator = torch.Generator().manual_seed(0)
    vectors, codebook = torch.randn(2, 5, 8, generator=generator), torch.randn(16, 8, generator=generator)
    distances = squared_distances(vectors, codebook)
    assert distances.shape == (2, 5, 16) and distances.dtype == torch.float32
    torch.testing.assert_close(distances, torch.cdist(vectors, codebook[None].expand(2, -1, -1)) ** 2,
                               rtol=1e-5, atol=1e-5)
    low = squared_distances(vectors.bfloat16(), codebook.bfloat16())
    assert low.dtype == torch.float32  # computed in float32 whatever the inputs


def test_distances_use_the_authors_formula_bit_for_bit():
    """``|z|^2 + |e|^2 - 2 z.e``, not ``|z - e|^2``: near-ties must resolve as the authors' code resolves them."""
    generator = torch.Generator().manual_seed(1)
    flat, codebook = torch.randn(64, 12, generator=generator), torch.randn(32, 12, generator=generator)
    expected = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
    assert torch.equal(squared_distances(flat, codebook), expected)
    assert torch.equal(nearest_code(flat, codebook), expected.argmin(dim=1))


def test_nearest_code_keeps_the_leading_shape_and_breaks_ties_by_lowest_id():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # codes 0 and 2 are the same vector
    vectors = torch.tensor([[[2.0, 0.1], [0.1, 3.0]], [[0.5, 0.5], [-1.0, 0.0]]])
    ids = nearest_code(vectors, codebook)
    assert ids.dtype == torch.int64 and ids.tolist() == [[0, 1], [0, 1]]


def test_base_tokenizer_and_latent_quantizer_use_it():
    torch.manual_seed(0)
    base = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 2), resolution=16, z_channels=8, codebook_dim=8, codebook_size=32))
    torch.nn.init.normal_(base.codebook)
    features = torch.randn(2, 8, 8, 8)
    flat = features.permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.equal(base.code_ids(features), nearest_code(flat, base.codebook).view(2, -1))
    quantizer = LatentQuantizer(64, 12)
    torch.nn.init.normal_(quantizer.codebook)
    vectors = torch.randn(3, 7, 12)
    expected = nearest_code(F.normalize(vectors, dim=-1), F.normalize(quantizer.codebook, dim=-1))
    assert torch.equal(quantizer.quantize(vectors), expected)
