"""``adaptive_tokenizer.metrics``: L1, PSNR, SSIM (one implementation for the evaluation and the training loss's
MS-SSIM), sharpness, colour offset, chroma."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaptive_tokenizer import metrics
from training.losses import ms_ssim


def textured(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen)


def blurred(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


# ---- L1, PSNR, SSIM ------------------------------------------------------------------------------------------
def test_ssim_psnr_of_identical_images():
    x = torch.rand(2, 3, 32, 40)
    assert metrics.ssim(x, x).tolist() == [1.0, 1.0]
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert metrics.ssim(flat, flat).item() == 1.0
    # PSNR of identical images is capped (documented): 100 dB, so the report stays valid JSON
    assert metrics.psnr(x, x).tolist() == [metrics.PSNR_CAP_DB, metrics.PSNR_CAP_DB]
    assert metrics.l1_error(x, x).tolist() == [0.0, 0.0]


def test_psnr_l1_known_values():
    x = torch.zeros(1, 3, 8, 8)
    y = torch.full((1, 3, 8, 8), 0.1)
    assert metrics.l1_error(x, y).item() == pytest.approx(0.1)
    assert metrics.psnr(x, y).item() == pytest.approx(20.0)  # MSE 0.01
    assert metrics.l1_error(x, y).dtype == metrics.psnr(x, y).dtype == torch.float64


def test_l1_psnr_broadcast_over_leading_dimensions():
    """``[N, I, C, H, W]`` against ``[N, 1, C, H, W]``: one value per image and budget, as per pair."""
    gen = torch.Generator().manual_seed(2)
    reconstructions, inputs = torch.rand(2, 3, 3, 8, 8, generator=gen), torch.rand(2, 1, 3, 8, 8, generator=gen)
    for measure in (metrics.l1_error, metrics.psnr):
        per_pair = measure(reconstructions.flatten(0, 1), inputs.expand_as(reconstructions).flatten(0, 1))
        assert torch.equal(measure(reconstructions, inputs), per_pair.view(2, 3))


def _ssim_by_definition(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. per window, straight from the definition (float64 loops): one channel, 'valid' windows."""
    coords = np.arange(11) - 5.0
    g = np.exp(-coords ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_matches_definition():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 16, 18, generator=generator)
    y = (x + 0.2 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    expected = np.mean([_ssim_by_definition(x[0, c].double().numpy(), y[0, c].double().numpy()) for c in range(3)])
    assert metrics.ssim(x, y).item() == pytest.approx(expected, abs=1e-5)
    assert -1 <= metrics.ssim(x, 1 - x).item() < 0.5
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(x[..., :8, :8], y[..., :8, :8])


def test_ssim_maps_serve_the_training_loss():
    """One SSIM: the training loss's MS-SSIM on a single scale is the evaluation's SSIM (float32 apart), the
    contrast-structure map is SSIM without its luminance term, and both are differentiable."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 24, 24, generator=gen, requires_grad=True)
    y = (x.detach() + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    ssim_map, cs_map = metrics.ssim_maps(x, y)
    assert ssim_map.shape == cs_map.shape == (2, 3, 14, 14) and ssim_map.dtype == torch.float32
    assert torch.equal(ssim_map.detach().double().mean(dim=(2, 3)).mean(1), metrics.ssim(x, y).detach())
    window = metrics.gaussian_window()
    kernel = torch.outer(window, window).float().expand(3, 1, 11, 11)
    mu_x, mu_y = (F.conv2d(t, kernel, groups=3) for t in (x.detach(), y))
    luminance = (2 * mu_x * mu_y + 1e-4) / (mu_x ** 2 + mu_y ** 2 + 1e-4)  # c1 = (0.01 * 1) ** 2
    assert torch.allclose(ssim_map.detach(), luminance * cs_map.detach(), atol=1e-5)
    assert torch.equal(metrics.ssim_maps(y, y)[1], torch.ones_like(cs_map))
    single_scale = ms_ssim(x, y, scales=1, window_size=11)
    assert single_scale.detach().tolist() == pytest.approx(metrics.ssim(x, y).tolist(), abs=1e-6)
    (gradient,) = torch.autograd.grad(single_scale.sum(), x)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


# ---- sharpness and colour ------------------------------------------------------------------------------------
def test_gradient_magnitude_of_a_ramp_and_of_a_flat_image():
    ramp = torch.linspace(0, 1, 11).view(1, 1, 1, 11).expand(1, 3, 11, 11)  # grey, luma step 0.1 along x
    assert metrics.gradient_magnitude(ramp).item() == pytest.approx(0.1, abs=1e-6)
    assert metrics.gradient_magnitude(torch.full((1, 3, 8, 8), 0.4)).item() == 0


def test_sharpness_ratio_falls_with_blur():
    x = textured()
    assert torch.allclose(metrics.sharpness_ratio(x, x), torch.ones(2))
    once, twice = blurred(x), blurred(blurred(x))
    ratio_once, ratio_twice = metrics.sharpness_ratio(once, x), metrics.sharpness_ratio(twice, x)
    assert (ratio_twice < ratio_once).all() and (ratio_once < 0.7).all()
    assert metrics.set_sharpness(once, x) == pytest.approx(
        (metrics.gradient_magnitude(once).sum() / metrics.gradient_magnitude(x).sum()).item())
    flat = torch.full((1, 3, 8, 8), 0.5)
    assert metrics.sharpness_ratio(flat, flat).item() == 1  # a flat input reconstructed flat: as sharp


def test_colour_offset_and_chroma():
    x = textured()
    assert torch.equal(metrics.colour_offset(x, x), torch.zeros(2))
    tinted = x + torch.tensor([0.03, 0.0, -0.03]).view(1, 3, 1, 1)
    assert torch.allclose(metrics.colour_offset(tinted, x), torch.full((2,), 0.02), atol=1e-6)
    grey_image = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    assert torch.equal(metrics.chroma(grey_image), torch.zeros(2))
    assert metrics.is_greyscale(grey_image).all() and not metrics.is_greyscale(x).any()
    cast = grey_image + torch.tensor([1.5, 0, -1.5]).view(1, 3, 1, 1) / 255  # a faint pink-blue cast
    assert torch.allclose(metrics.chroma(cast), torch.full((2,), 1 / 255), atol=1e-6)
    assert metrics.is_greyscale(cast).all()  # still within the greyscale tolerance of an input
