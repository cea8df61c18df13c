"""Losses: L1, MS-SSIM (written here; no pretrained networks), label-smoothed cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Wang et al. 2003 scale weights; fewer scales use the first ones, renormalised.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> Tensor:
    coords = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g.to(dtype)[None, None, None, :].expand(channels, 1, 1, size).contiguous()


def _blur(x: Tensor, window: Tensor) -> Tensor:
    """Separable Gaussian filter, 'valid' borders."""
    channels = x.shape[1]
    x = F.conv2d(x, window, groups=channels)
    return F.conv2d(x, window.transpose(2, 3), groups=channels)


def _ssim_parts(x: Tensor, y: Tensor, window: Tensor, data_range: float) -> tuple[Tensor, Tensor]:
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    sxx = _blur(x * x, window) - mu_x**2
    syy = _blur(y * y, window) - mu_y**2
    sxy = _blur(x * y, window) - mu_x * mu_y
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


def ms_ssim(x: Tensor, y: Tensor, scales: int | None = None, window_size: int = 7, sigma: float = 1.5,
            data_range: float = 1.0) -> Tensor:
    """Multi-scale SSIM per image, ``[N]``, computed in float32. ``scales``: as many as fit (<= 5) when None.

    Contrast/structure terms are clamped at 0 before the weighted geometric mean (keeps gradients finite).
    """
    x, y = x.float(), y.float()
    max_scales = 1
    while max_scales < 5 and min(x.shape[-2:]) // 2**max_scales >= window_size:
        max_scales += 1
    scales = min(scales or max_scales, max_scales)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], device=x.device)
    weights = weights / weights.sum()
    window = _gaussian_window(window_size, sigma, x.shape[1], x.device, x.dtype)
    values = []
    for scale in range(scales):
        ssim, cs = _ssim_parts(x, y, window, data_range)
        if scale == scales - 1:
            values.append(ssim.clamp_min(1e-6))
        else:
            values.append(cs.clamp_min(1e-6))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(values, dim=1)  # [N, scales]
    return torch.exp((stacked.log() * weights).sum(1))


def reconstruction_loss(recon: Tensor, target: Tensor, ssim_weight: float) -> tuple[Tensor, dict[str, float]]:
    """``L1 + ssim_weight * (1 - MS-SSIM)``, in float32. Returns the loss and its parts for logging."""
    recon, target = recon.float(), target.float()
    l1 = (recon - target).abs().mean()
    loss = l1
    parts = {"l1": l1.item()}
    if ssim_weight > 0:
        msssim = ms_ssim(recon, target).mean()
        loss = loss + ssim_weight * (1 - msssim)
        parts["msssim"] = msssim.item()
    return loss, parts


def smoothed_cross_entropy(logits: Tensor, targets: Tensor, smoothing: float = 0.1) -> Tensor:
    """Cross-entropy with label smoothing; ``logits [..., K]``, ``targets [...]`` int64; float32 math."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           label_smoothing=smoothing)
