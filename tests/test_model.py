"""``adaptive_tokenizer.model``: the base tokenizer's own reconstruction and its error, the one home that the
evaluation, ``AdaptiveTokenizer.base_errors`` and the training stages call."""

from __future__ import annotations

import torch

from adaptive_tokenizer.metrics import l1_error
from adaptive_tokenizer.model import base_reconstruction, base_reconstruction_error


def test_base_reconstruction_is_encode_nearest_codes_decode(tok_a, images):
    base = tok_a.model.base
    with torch.inference_mode():
        features = base.encode(images)
        ids = base.code_ids(features)
        raw = base.decode_ids(ids).float()
        reconstruction = base_reconstruction(base, images)
        # the steps a caller already ran are not run again, and give the same pixels
        assert torch.equal(base_reconstruction(base, images, features=features), reconstruction)
        assert torch.equal(base_reconstruction(base, images, code_ids=ids, clamp=False), raw)
    assert reconstruction.dtype == torch.float32 and torch.equal(reconstruction, raw.clamp(0, 1))
    assert reconstruction.min() >= 0 and reconstruction.max() <= 1


def test_base_reconstruction_error_is_the_l1_of_the_reconstruction(tok_a, images):
    base = tok_a.model.base
    with torch.inference_mode():
        clamped = base_reconstruction_error(base, images)
        unclamped = base_reconstruction_error(base, images, clamp=False)
        assert torch.equal(clamped, l1_error(base_reconstruction(base, images), images))
        # the model's unclamped floor (what AdaptiveTokenizer.base_errors reports) is the same computation, float32
        ids = base.code_ids(base.encode(images))
        assert torch.equal(tok_a.model.base_error(images, ids), unclamped.float())
    assert clamped.dtype == torch.float64 and clamped.shape == (len(images),)
    assert (clamped <= unclamped + 1e-12).all()  # clamping to [0, 1] can only bring pixels closer to the input
