"""``adaptive_tokenizer.metrics`` (sharpness, colour offset, chroma) and their columns in ``evaluate``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from adaptive_tokenizer import evaluate as ev
from adaptive_tokenizer import metrics
from adaptive_tokenizer.image_io import load_images


def textured(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen)


def blurred(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


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


def test_evaluate_reports_sharpness_and_colour_per_budget(tok_a, tmp_path):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "a_colour.png")
    Image.fromarray(colour[..., 0]).convert("RGB").save(tmp_path / "b_grey.png")
    report = ev.evaluate_folder(tok_a, tmp_path, tmp_path / "out", max_tokens=64, grid_images=1, progress=False)
    assert report["base_ceiling"]["greyscale_images"] == 1
    inputs = load_images([str(tmp_path / "a_colour.png"), str(tmp_path / "b_grey.png")], tok_a.config.image_size)
    pixels, _ = tok_a.reconstructions(inputs, max_tokens=64)
    for i, row in enumerate(report["fixed"]):
        assert row["sharpness"] == pytest.approx(metrics.set_sharpness(pixels[:, i], inputs), rel=1e-5)
        assert row["colour_offset"] == pytest.approx(metrics.colour_offset(pixels[:, i], inputs).mean().item(),
                                                     rel=1e-5)
        assert row["greyscale_chroma"] == pytest.approx(metrics.chroma(pixels[1:, i]).item(), rel=1e-5)
    grey_record = report["images"][1]
    assert grey_record["greyscale"] and len(grey_record["chroma"]) == len(report["budgets"]) + 1  # + the base
    table = ev.format_table(report)
    assert "sharpness" in table and "(1 greyscale)" in table
