"""``adaptive_tokenizer.evaluation.report`` and ``.table``: the typed report, ``report.json`` written from it and read
back into it, and the printed summary (reports built without a model: ``tests/evaluation_data.py``)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from adaptive_tokenizer.evaluation import EvaluationReport, format_table, read_report, write_report
from adaptive_tokenizer.evaluation.report import REPORT_FILE

from .evaluation_data import synthetic_report

SECTIONS = ["format", "metadata", "budgets", "fixed", "base_ceiling", "adaptive", "complexity", "length_rules",
            "images", "figures", "grid_images"]


@pytest.mark.parametrize("predictor", [True, False])
def test_report_round_trips_through_json(predictor, tmp_path):
    report = synthetic_report(predictor=predictor)
    data = report.to_dict()
    assert list(data) == SECTIONS
    assert EvaluationReport.from_dict(data) == report
    assert EvaluationReport.from_dict(json.loads(json.dumps(data, allow_nan=False))) == report
    path = write_report(report, tmp_path)
    assert path == tmp_path / REPORT_FILE and json.loads(path.read_text()) == data
    assert read_report(tmp_path) == read_report(path) == report
    # without a length predictor the predicted rule is left out (not written as null)
    assert ("predicted" in data["length_rules"]) == predictor
    assert (data["images"][0]["predicted_error"] is None) == (not predictor)


def test_undefined_correlations_are_null():
    """One threshold that every image meets at the first budget: constant lengths, no rank correlation."""
    report = synthetic_report(thresholds=[1.0])
    assert [image.chosen_tokens for image in report.images] == [[32]] * 6
    assert report.complexity.spearman_length_vs_complexity is None
    data = report.to_dict()
    assert data["complexity"]["spearman_length_vs_complexity"] is None
    assert EvaluationReport.from_dict(data) == report


def test_sections_hold_the_numbers_of_the_tables():
    report = synthetic_report()
    assert report.budgets == [32, 64, 96, 128] and [row.budget for row in report.fixed] == report.budgets
    for index, row in enumerate(report.fixed):
        assert row.l1 == pytest.approx(sum(image.l1[index] for image in report.images) / len(report.images))
    adaptive = report.adaptive
    for index, level in enumerate(adaptive.levels):
        chosen = [image.chosen_tokens[index] for image in report.images]
        assert level.mean_tokens == pytest.approx(sum(chosen) / len(chosen))
        assert level.histogram == [chosen.count(b) for b in report.budgets]
    assert adaptive.comparison.threshold == adaptive.levels[adaptive.target_level].threshold
    assert report.base_ceiling.fidelity.greyscale_images == 2 and report.base_ceiling.grid_tokens == 256


def test_table_reads_the_typed_report_and_its_json_form():
    report = synthetic_report()
    table = format_table(report)
    assert format_table(report.to_dict()) == table
    assert table.splitlines()[0] == "6 images from photos"
    assert "VQGAN" in table and "<- closest to 64" in table and "predicted:" in table and "sharpness" in table
    # a report written before the sharpness and colour measures: no fidelity lines
    older = report.to_dict()
    for row in [*older["fixed"], older["base_ceiling"]]:
        for key in ("sharpness", "colour_offset", "greyscale_chroma", "greyscale_images"):
            del row[key]
    assert "sharpness" not in format_table(older)
    without_predictor = dataclasses.replace(report, length_rules=dataclasses.replace(report.length_rules,
                                                                                     predicted=None))
    assert "predicted" not in format_table(without_predictor)
