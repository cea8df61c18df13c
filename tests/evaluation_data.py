"""A report built without a model: seeded tables of one pass (errors falling with the budget), through the same
``build_report`` as ``evaluate_folder``; for the report and figure tests."""

from __future__ import annotations

import numpy as np
import torch

from adaptive_tokenizer.evaluation.measure import Measurements
from adaptive_tokenizer.evaluation.report import METRIC_NOTES, REPORT_FORMAT, Metadata, ModelSummary, TokenRange
from adaptive_tokenizer.evaluation.run import build_report

STEP = 32


def synthetic_measurements(num_images: int = 6, iterations: int = 4, *, predictor: bool = True,
                           seed: int = 0) -> Measurements:
    gen = torch.Generator().manual_seed(seed)
    errors = (torch.rand(num_images, iterations, generator=gen) * 0.05
              + torch.linspace(0.12, 0.04, iterations)).float()
    l1 = errors.double() * 0.95

    def table(columns: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(num_images, columns, generator=gen)

    return Measurements(
        errors=errors, predicted=errors * 1.05 if predictor else None, l1=l1,
        psnr=10 * torch.log10(1 / l1.pow(2)), ssim=table(iterations, 0.3, 0.7).double(),
        base=torch.stack([l1[:, -1] * 0.9, torch.full((num_images,), 25.0, dtype=torch.float64),
                          torch.full((num_images,), 0.7, dtype=torch.float64)], 1),
        complexity=np.linspace(0.1, 1.0, num_images), gradient=table(iterations + 1, 0.02, 0.05),
        offset=table(iterations + 1, 0.0, 0.02), chroma=table(iterations + 1, 0.0, 0.01),
        input_gradient=table(1, 0.05, 0.08)[:, 0], greyscale=torch.arange(num_images) % 3 == 0)


def synthetic_metadata(num_images: int, iterations: int) -> Metadata:
    summary = ModelSummary(image_size=128, latent_kind="quantized", rollout="cached",
                           tokens=TokenRange(min=STEP, max=STEP * iterations, step=STEP, model_max=STEP * iterations),
                           dynamic_halting=False, dynamic_halting_confidence=0.55, length_predictor=True,
                           encoder="256x4", decoder="256x4", codebook_size=4096, parameters={"total": 1},
                           description=None)
    return Metadata(model="synthetic", folder="photos", num_images=num_images, command=None, elapsed_s=1.5,
                    model_summary=summary, config={"image_size": 128}, device="cpu", dtype="float32", torch="2",
                    python="3", metric_notes=dict(METRIC_NOTES))


def synthetic_report(num_images: int = 6, iterations: int = 4, *, predictor: bool = True,
                     thresholds: list[float] | None = None):
    measured = synthetic_measurements(num_images, iterations, predictor=predictor)
    report = build_report(measured, [f"image_{i}.png" for i in range(num_images)], thresholds,
                          synthetic_metadata(num_images, iterations), tokens_per_iteration=STEP, grid_tokens=256,
                          margin=0.07 if predictor else 0.0, target_tokens=64)
    assert report.format == REPORT_FORMAT
    return report
