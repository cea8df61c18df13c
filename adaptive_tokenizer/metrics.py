"""What the eye sees beside L1 / PSNR / SSIM: sharpness and colour fidelity of a reconstruction.

One home for these measures: ``adaptive_tokenizer.evaluate`` reports them, ``training`` validates with them and
builds its gradient / colour losses on the same finite differences and chroma. All take ``[N, 3, H, W]`` images in
[0, 1] and return one value per image, ``[N]`` (float32, differentiable).

- :func:`gradient_magnitude`: mean gradient magnitude of the grey (Rec. 601 luma) image, forward finite
  differences; a reconstruction's over the input's is its sharpness (1: as sharp; L1-trained averages: well below).
- :func:`colour_offset`: mean over channels of |mean(reconstruction) - mean(input)| (a colour cast or a
  brightness shift).
- :func:`chroma`: mean over pixels of |channel - mean of the channels|, averaged over channels; 0 for a grey
  image, so the chroma of the reconstruction of a greyscale input is the colour it invented.
"""

from __future__ import annotations

import torch
from torch import Tensor

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # Rec. 601
GREYSCALE_TOLERANCE = 2 / 255  # an input is greyscale when no pixel's channels differ from their mean by more


def grey(images: Tensor) -> Tensor:
    """``[N, 3, H, W]`` -> ``[N, 1, H, W]`` Rec. 601 luma."""
    weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def finite_differences(images: Tensor) -> tuple[Tensor, Tensor]:
    """Forward differences ``(dx, dy)`` of ``[N, C, H, W]``, both cropped to ``[N, C, H - 1, W - 1]``."""
    dx = images[..., :-1, 1:] - images[..., :-1, :-1]
    dy = images[..., 1:, :-1] - images[..., :-1, :-1]
    return dx, dy


def gradient_magnitude_map(images: Tensor, eps: float = 0.0) -> Tensor:
    """``[N, 1, H - 1, W - 1]`` gradient magnitude of the grey image (``eps`` inside the root keeps the gradient
    of a loss finite on flat areas)."""
    dx, dy = finite_differences(grey(images.float()))
    return (dx * dx + dy * dy + eps).sqrt()


def gradient_magnitude(images: Tensor) -> Tensor:
    """Mean gradient magnitude of the grey image, ``[N]``."""
    return gradient_magnitude_map(images).flatten(1).mean(1)


def sharpness_ratio(reconstructions: Tensor, inputs: Tensor) -> Tensor:
    """Per image, the reconstruction's mean gradient magnitude over the input's, ``[N]`` (a flat input: 1 when
    the reconstruction is flat too). Over a set, report ``gradient_magnitude`` summed (see :func:`set_sharpness`)."""
    num, den = gradient_magnitude(reconstructions), gradient_magnitude(inputs)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.where(num > 0, torch.inf, 1.0))


def set_sharpness(reconstructions: Tensor, inputs: Tensor) -> float:
    """Over a set: the mean gradient magnitude of the reconstructions over the inputs' (a ratio of means, so that
    nearly flat images do not dominate)."""
    return float(gradient_magnitude(reconstructions).sum() / gradient_magnitude(inputs).sum().clamp_min(1e-12))


def colour_offset(reconstructions: Tensor, inputs: Tensor) -> Tensor:
    """Mean over channels of |per-channel mean of the reconstruction - of the input|, ``[N]``."""
    difference = reconstructions.float().mean(dim=(2, 3)) - inputs.float().mean(dim=(2, 3))
    return difference.abs().mean(1)


def chroma_map(images: Tensor) -> Tensor:
    """Each channel minus the mean of the channels, ``[N, 3, H, W]`` (zero for grey pixels)."""
    images = images.float()
    return images - images.mean(dim=1, keepdim=True)


def chroma(images: Tensor) -> Tensor:
    """Mean |channel - mean of the channels| over pixels and channels, ``[N]``; 0 for a grey image."""
    return chroma_map(images).abs().flatten(1).mean(1)


def is_greyscale(images: Tensor, tolerance: float = GREYSCALE_TOLERANCE) -> Tensor:
    """``[N]`` bool: no pixel's channels differ from their mean by more than ``tolerance``."""
    return chroma_map(images).abs().flatten(1).amax(1) <= tolerance
