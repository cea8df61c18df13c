"""Image quality measures, one home for each: L1, PSNR and SSIM, sharpness and colour fidelity.

``adaptive_tokenizer.evaluation`` reports them, ``training`` validates with them and builds its losses on them
(MS-SSIM on :func:`ssim_maps`, the gradient and colour terms on the same finite differences and chroma). All
take images ``[N, C, H, W]`` in [0, 1] (``data_range`` 1) and return one value per image, ``[N]``.

- :func:`l1_error`: mean absolute difference (float64); :func:`psnr`: ``10 log10(1 / MSE)`` (float64), capped
  at :data:`PSNR_CAP_DB` (MSE floored at 1e-10) so that identical images give a finite number (valid JSON).
- :func:`ssim`: Wang et al. (2004), Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, "valid" filtering (no
  padding), the SSIM map averaged per channel, then over channels, filtered in float32 (``ssim(x, x) == 1``
  exactly). :func:`ssim_maps` is the same computation returning the SSIM and contrast-structure maps
  (differentiable; the training loss's MS-SSIM uses them).
- :func:`gradient_magnitude`: mean gradient magnitude of the grey (Rec. 601 luma) image, forward finite
  differences; a reconstruction's over the input's is its sharpness (1: as sharp; L1-trained averages: well below).
- :func:`colour_offset`: mean over channels of |mean(reconstruction) - mean(input)| (a colour cast or a
  brightness shift).
- :func:`chroma`: mean over pixels of |channel - mean of the channels|, averaged over channels; 0 for a grey
  image, so the chroma of the reconstruction of a greyscale input is the colour it invented.

The sharpness and colour measures are float32 and differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from .errors import InputError

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # Rec. 601
GREYSCALE_TOLERANCE = 2 / 255  # an input is greyscale when no pixel's channels differ from their mean by more
PSNR_CAP_DB = 100.0


# ---- L1, PSNR, SSIM ------------------------------------------------------------------------------------------
def l1_error(x: Tensor, y: Tensor) -> Tensor:
    """Mean absolute difference per image (float64): ``[..., C, H, W]`` x2 (broadcast) -> ``[...]``."""
    return (x.double() - y.double()).abs().mean(dim=(-3, -2, -1))


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR in dB per image (float64), ``[..., C, H, W]`` x2 (broadcast) -> ``[...]``; identical images give
    :data:`PSNR_CAP_DB` (MSE floored at ``data_range**2 * 1e-10``)."""
    mse = (x.double() - y.double()).pow(2).mean(dim=(-3, -2, -1))
    floor = data_range ** 2 * 10 ** (-PSNR_CAP_DB / 10)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(floor))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """Normalised 1-D Gaussian, float64 ``[size]``."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return window / window.sum()


def ssim_maps(x: Tensor, y: Tensor, *, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0,
              k1: float = 0.01, k2: float = 0.03) -> tuple[Tensor, Tensor]:
    """The SSIM map and the contrast-structure map of ``[N, C, H, W]`` x2, each ``[N, C, H - w + 1, W - w + 1]``
    float32 (Gaussian window ``w``, separable, "valid" filtering; differentiable). :func:`ssim` averages the first;
    multi-scale SSIM combines the second at coarser scales with the first at the coarsest."""
    if x.shape != y.shape or x.dim() != 4:
        raise InputError(f"ssim needs two [N, C, H, W] tensors of the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if min(x.shape[-2:]) < window_size:
        raise InputError(f"ssim needs images of at least {window_size}x{window_size} pixels, got {tuple(x.shape)}")
    x, y = x.float(), y.float()
    channels = x.shape[1]
    groups = 5 * channels
    window = gaussian_window(window_size, sigma).to(device=x.device, dtype=torch.float32)
    kernel_h = window.view(1, 1, 1, -1).expand(groups, 1, 1, window_size).contiguous()
    kernel_v = window.view(1, 1, -1, 1).expand(groups, 1, window_size, 1).contiguous()
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    blurred = F.conv2d(F.conv2d(stacked, kernel_h, groups=groups), kernel_v, groups=groups)
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = blurred.split(channels, dim=1)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    sigma_x, sigma_y = mean_xx - mu_x * mu_x, mean_yy - mu_y * mu_y
    sigma_xy = mean_xy - mu_x * mu_y
    ssim_map = (((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2))
                / ((mu_x * mu_x + mu_y * mu_y + c1) * (sigma_x + sigma_y + c2)))
    return ssim_map, (2 * sigma_xy + c2) / (sigma_x + sigma_y + c2)


def ssim(x: Tensor, y: Tensor, *, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """SSIM (Wang et al. 2004) per image, ``[N, C, H, W]`` x2 -> ``[N]`` float64: the SSIM map of :func:`ssim_maps`
    averaged per channel, then over channels. Filtered in float32 (17x faster than float64 on CPU; results differ
    by < 1e-6); ``ssim(x, x)`` is exactly 1."""
    ssim_map, _ = ssim_maps(x, y, window_size=window_size, sigma=sigma, data_range=data_range, k1=k1, k2=k2)
    return ssim_map.double().mean(dim=(2, 3)).mean(dim=1)


# ---- sharpness and colour ------------------------------------------------------------------------------------


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
