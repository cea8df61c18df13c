"""The length predictor: each image's reconstruction error at every length, estimated after one encoder iteration.

It reads only what the first rollout iteration has already computed (the input pixels, the base encoder's
features, the encoder's outputs for the class token, the 2D tokens and latent block 0), so
``encode(halt_threshold=E, length_rule="predicted")`` can fix each image's length up front and run exactly those
iterations with no decoder and no pixel decode. The head is a small MLP over standardised features whose outputs
are the logs of the mean absolute pixel errors at lengths ``tokens_per_iteration * (1..max_iterations)``.

Fitting (``fit_length_predictor.py``) measures those errors with one traced rollout per training image and fits
the head; the result is saved with the model (``config.length_predictor`` + ``length_predictor.*`` tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError
from .codebook import squared_distances
from .config import LengthPredictorConfig, ModelConfig

GRADIENT_SCALES = (1, 2, 4, 8)


def feature_sizes(config: ModelConfig) -> dict[str, int]:
    """Size of every feature group for a model of ``config``."""
    return {"pixels": len(GRADIENT_SCALES) + 7, "base": 2 * config.base.z_channels + 3, "class": config.encoder_width,
            "image_tokens": 2 * config.encoder_width, "latents": 2 * config.encoder_width}


def pixel_features(pixels: Tensor) -> Tensor:
    """``[n, 3, R, R]`` -> ``[n, 11]``: mean |finite difference| of the grey image at 4 scales, per-channel
    std and mean, and mean chroma (|channel - grey|)."""
    pixels = pixels.float()
    grey = pixels.mean(dim=1, keepdim=True)
    columns = []
    for scale in GRADIENT_SCALES:
        g = F.avg_pool2d(grey, scale) if scale > 1 else grey
        dx = (g[..., :, 1:] - g[..., :, :-1]).abs().mean(dim=(1, 2, 3))
        dy = (g[..., 1:, :] - g[..., :-1, :]).abs().mean(dim=(1, 2, 3))
        columns.append(dx + dy)
    chroma = (pixels - grey).abs().mean(dim=(1, 2, 3))
    return torch.cat([torch.stack(columns, 1), pixels.std(dim=(2, 3)), pixels.mean(dim=(2, 3)), chroma[:, None]], 1)


def base_features(features: Tensor, codebook: Tensor) -> Tensor:
    """Base encoder features ``[n, C, g, g]`` -> ``[n, 2C + 3]``: per-channel mean and std, and the mean, std and
    max over cells of the squared distance to the nearest base code (how well the base's codebook fits)."""
    flat = features.float().flatten(2).transpose(1, 2)  # [n, G2, C]
    residual = squared_distances(flat, codebook).min(dim=-1).values.clamp(min=0)  # [n, G2]
    return torch.cat([flat.mean(1), flat.std(1), residual.mean(1, keepdim=True), residual.std(1, keepdim=True),
                      residual.max(1, keepdim=True).values], 1)


def feature_vector(groups: tuple[str, ...], prefix_out: Tensor, latents: Tensor, base_encoding: Tensor,
                   pixels: Tensor, codebook: Tensor) -> Tensor:
    """The predictor's raw input ``[n, F]`` float32: the feature ``groups`` (``PREDICTOR_FEATURES`` order)
    concatenated.

    ``prefix_out``: encoder outputs of the class token and 2D tokens at iteration 0, ``[n, 1+G2, W]``;
    ``latents``: of latent block 0, ``[n, T, W]``; ``base_encoding``: base encoder features ``[n, C, g, g]``;
    ``pixels``: the input ``[n, 3, R, R]``; ``codebook``: the base codebook.
    """
    image_tokens = prefix_out[:, 1:].float()
    compute = {
        "pixels": lambda: pixel_features(pixels),
        "base": lambda: base_features(base_encoding, codebook),
        "class": lambda: prefix_out[:, 0].float(),
        "image_tokens": lambda: torch.cat([image_tokens.mean(1), image_tokens.std(1)], 1),
        "latents": lambda: torch.cat([latents.float().mean(1), latents.float().std(1)], 1),
    }
    return torch.cat([compute[name]() for name in groups], dim=1)


class LengthPredictor(nn.Module):
    """Features of the first iteration -> predicted mean absolute error at every length, ``[n, max_iterations]``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        head: LengthPredictorConfig = config.length_predictor
        sizes = feature_sizes(config)
        expected = sum(sizes[name] for name in head.features)
        if head.num_inputs != expected:
            raise InputError(f"LengthPredictorConfig.num_inputs is {head.num_inputs}, but the features "
                             f"{list(head.features)} of this model have {expected} values")
        self.groups, self.margin = head.features, float(head.margin)
        self.register_buffer("feature_mean", torch.zeros(expected))
        self.register_buffer("feature_std", torch.ones(expected))
        outputs = config.max_iterations
        if head.hidden:
            self.net = nn.Sequential(nn.Linear(expected, head.hidden), nn.GELU(), nn.Linear(head.hidden, outputs))
        else:
            self.net = nn.Sequential(nn.Linear(expected, outputs))

    def forward_features(self, features: Tensor) -> Tensor:
        """Raw features ``[n, F]`` -> predicted log errors ``[n, max_iterations]``."""
        standardised = (features.float() - self.feature_mean.float()) / self.feature_std.float()
        return self.net(standardised.to(self.net[0].weight.dtype)).float()

    def forward(self, features: Tensor) -> Tensor:
        """Raw features ``[n, num_inputs]`` (:func:`feature_vector`) -> predicted mean absolute error at every
        length, ``[n, max_iterations]`` float32."""
        return self.forward_features(features).exp()
