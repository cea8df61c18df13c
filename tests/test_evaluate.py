"""``adaptive-tokenizer evaluate`` / ``evaluation.evaluate_folder`` end to end: the report's numbers against the
metrics recomputed here, adaptive choices (checked against ``encode``), complexity, figures, the CLI.

One evaluation runs per module (the tiny quantized model, 4 images, budgets up to 96 to stay fast); the tests read
its report and figures. The parts have their own tests: ``test_metrics.py``, ``test_evaluation_lengths.py``,
``test_evaluation_report.py``, ``test_evaluation_figures.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from adaptive_tokenizer import metrics
from adaptive_tokenizer.cli import main
from adaptive_tokenizer.evaluation import (FIGURES, REPORT_FORMAT, EvaluationReport, evaluate_folder, format_table,
                                          jpeg_complexity)
from adaptive_tokenizer.image_io import load_images
from adaptive_tokenizer.stats import spearman

from .tolerances import base_error_atol, error_atol

FIXTURES = Path(__file__).parent / "fixtures"
MAX_TOKENS = 96  # 3 budgets: the VQGAN pixel decoder dominates the run time
NAMES = ("a_bird.png", "b_porg.jpg", "c_room.png", "d_flat.png")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: on a shared 2-core machine, 2 spinning OpenMP threads ran it 3x slower
    (35 s instead of 10 s). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """The 3 reference images (PNG, JPEG, PNG) and a flat-colour 300x200 image (resized, centre-cropped)."""
    folder = tmp_path_factory.mktemp("eval_images")
    images = load_file(FIXTURES / "inputs.safetensors")["imgs_u8"]
    for name, image in zip(NAMES, images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / name, quality=95)
    Image.new("RGB", (300, 200), (200, 120, 40)).save(folder / NAMES[3])
    (folder / "readme.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def evaluation(converted_dirs, image_folder, tmp_path_factory):
    """(exit code, stdout, stderr, out_dir, report) of one CLI run (capsys is per test: redirect instead)."""
    out_dir = tmp_path_factory.mktemp("eval_out") / "report"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["evaluate", str(image_folder), "--model", str(converted_dirs["A"]), "-o", str(out_dir),
                     "--max-tokens", str(MAX_TOKENS), "--batch-size", "3"])
    report = json.loads((out_dir / "report.json").read_text()) if code == 0 else None
    return code, stdout.getvalue(), stderr.getvalue(), out_dir, report


# ---- the evaluation run --------------------------------------------------------------------------------------
def test_cli_run_and_table(evaluation):
    code, out, err, out_dir, report = evaluation
    assert code == 0, err
    assert "4 images" in out and "VQGAN" in out and "adaptive" in out and "Spearman" in out
    assert f"wrote {out_dir / 'report.json'}" in out
    for budget in (32, 64, 96):
        assert any(line.split()[:1] == [str(budget)] for line in out.splitlines())


def test_report_structure(evaluation, converted_dirs, image_folder):
    *_, report = evaluation
    assert set(report) >= {"format", "metadata", "budgets", "fixed", "base_ceiling", "adaptive", "complexity",
                           "images", "figures"}
    assert report["format"] == REPORT_FORMAT
    meta = report["metadata"]
    assert meta["num_images"] == 4 and meta["folder"] == str(image_folder) and meta["model"] == str(converted_dirs["A"])
    assert meta["command"][:3] == ["adaptive-tokenizer", "evaluate", str(image_folder)]
    assert "--max-tokens" in meta["command"] and meta["elapsed_s"] > 0
    assert meta["model_summary"]["latent_kind"] == "quantized" and meta["config"]["codebook_size"] == 128
    budgets = report["budgets"]
    assert budgets == [32, 64, 96] and all(a < b for a, b in zip(budgets, budgets[1:]))
    assert [row["budget"] for row in report["fixed"]] == budgets
    assert [row["file"] for row in report["images"]] == sorted(NAMES)


def test_report_json_is_the_typed_report(evaluation):
    """report.json is written from the dataclasses and reads back into them unchanged."""
    *_, out_dir, report = evaluation
    typed = EvaluationReport.from_dict(report)
    assert typed.to_dict() == report
    assert typed.fixed[0].budget == 32 and typed.adaptive.levels[0].histogram == report["adaptive"]["levels"][0][
        "histogram"]
    assert (out_dir / "report.json").read_text() == json.dumps(typed.to_dict(), indent=1) + "\n"


def test_metric_ranges(evaluation):
    *_, report = evaluation
    rows = report["fixed"] + [report["base_ceiling"]]
    for row in rows:
        assert 0 <= row["l1"] <= 1 and 0 < row["psnr"] <= metrics.PSNR_CAP_DB and -1 <= row["ssim"] <= 1
    for image in report["images"]:
        assert len(image["l1"]) == len(image["psnr"]) == len(image["ssim"]) == len(report["budgets"])
        # clamping to [0, 1] can only lower the error
        assert all(c <= u + 1e-6 for c, u in zip(image["l1"], image["error_unclamped"]))
        assert image["complexity"] > 0
    flat = next(image for image in report["images"] if image["file"] == "d_flat.png")
    assert flat["complexity"] == min(image["complexity"] for image in report["images"])


def test_metrics_recomputed(evaluation, tok_a, image_folder):
    """Per-image numbers equal metrics recomputed here from reconstructions() and the base VQGAN."""
    *_, report = evaluation
    name = "c_room.png"
    row = next(image for image in report["images"] if image["file"] == name)
    inputs = load_images(str(image_folder / name), tok_a.config.image_size)
    pixels, errors = tok_a.reconstructions(inputs, max_tokens=MAX_TOKENS)
    targets = inputs.expand(len(report["budgets"]), -1, -1, -1)
    assert row["l1"] == pytest.approx(metrics.l1_error(pixels[0], targets).tolist(), abs=error_atol(tok_a))
    assert row["ssim"] == pytest.approx(metrics.ssim(pixels[0], targets).tolist(), abs=1e-5)
    assert row["error_unclamped"] == pytest.approx(errors[0].tolist(), abs=error_atol(tok_a))
    with torch.inference_mode():
        base = tok_a.model.base
        ceiling = base.decode_ids(base.code_ids(base.encode(inputs))).clamp(0, 1)
    assert row["base"]["l1"] == pytest.approx(metrics.l1_error(ceiling, inputs).item(), abs=base_error_atol(tok_a))
    assert row["complexity"] == pytest.approx(jpeg_complexity(inputs[0]))


def test_adaptive_levels(evaluation):
    *_, report = evaluation
    adaptive, budgets = report["adaptive"], report["budgets"]
    assert adaptive["thresholds_source"] == "auto"
    levels = adaptive["levels"]
    assert len(levels) >= 2
    thresholds = [level["threshold"] for level in levels]
    assert thresholds == sorted(thresholds) and len(set(thresholds)) == len(thresholds)
    for index, level in enumerate(levels):
        assert sum(level["histogram"]) == 4 and len(level["histogram"]) == len(budgets)
        assert budgets[0] <= level["mean_tokens"] <= budgets[-1]
        chosen = [image["chosen_tokens"][index] for image in report["images"]]
        assert level["mean_tokens"] == pytest.approx(np.mean(chosen))
        assert level["histogram"] == [chosen.count(b) for b in budgets]
    # lengths shrink as the threshold grows; auto thresholds reach both ends of the range
    means = [level["mean_tokens"] for level in levels]
    assert all(a >= b for a, b in zip(means, means[1:]))
    target = adaptive["target_level"]
    assert abs(means[target] - 128) == min(abs(m - 128) for m in means)
    comparison = adaptive["comparison"]
    # budgets stop at 96 here: the fixed budget compared is the one closest to 128
    assert comparison["threshold"] == thresholds[target] and comparison["fixed_budget"] == 96
    assert comparison["fixed_mean_l1"] == report["fixed"][-1]["l1"]
    assert comparison["adaptive_mean_l1"] == levels[target]["mean_l1"]
    # the bound on any length rule: at most 128 tokens on average, never worse than the fixed budget
    best = comparison["best_allocation"]
    assert best["mean_tokens"] <= 128 and best["mean_l1"] <= comparison["fixed_mean_l1"] + 1e-12
    assert sum(best["histogram"]) == 4 and len(best["histogram"]) == len(budgets)


def test_paired_difference_is_that_of_the_images(evaluation):
    *_, report = evaluation
    rows, budgets = report["images"], report["budgets"]
    comparison, target = report["adaptive"]["comparison"], report["adaptive"]["target_level"]
    per_image = [row["l1"][budgets.index(row["chosen_tokens"][target])] - row["l1"][budgets.index(
        comparison["fixed_budget"])] for row in rows]
    assert comparison["per_image"]["mean"] == pytest.approx(np.mean(per_image))
    assert comparison["per_image"]["better"] == sum(d < 0 for d in per_image)


def test_adaptive_choices_equal_encode(evaluation, tok_a, image_folder):
    """The choices computed from reconstructions() errors are what encode(halt_threshold=t) chooses (all images at
    the level with the most varied lengths; 2 images at the ~128 level, to save time), and the adaptive L1 is that
    of decode()'s output."""
    *_, report = evaluation
    rows, budgets = report["images"], report["budgets"]
    levels, target = report["adaptive"]["levels"], report["adaptive"]["target_level"]
    varied = max(range(len(levels)), key=lambda i: (len({row["chosen_tokens"][i] for row in rows}),
                                                    -levels[i]["mean_tokens"]))  # then the cheapest
    assert len({row["chosen_tokens"][varied] for row in rows}) > 1
    checks = [(varied, rows)] + ([(target, [rows[0], rows[-1]])] if target != varied else [])
    for index, subset in checks:
        paths = [str(image_folder / row["file"]) for row in subset]
        result = tok_a.encode(paths, max_tokens=MAX_TOKENS, halt_threshold=levels[index]["threshold"])
        assert result.num_tokens.tolist() == [row["chosen_tokens"][index] for row in subset]
        if index == checks[-1][0]:
            decoded = tok_a.decode(result)
            inputs = load_images(paths, tok_a.config.image_size)
            chosen_l1 = [row["l1"][budgets.index(row["chosen_tokens"][index])] for row in subset]
            assert metrics.l1_error(decoded, inputs).tolist() == pytest.approx(chosen_l1, abs=error_atol(tok_a))
    all_l1 = [row["l1"][budgets.index(row["chosen_tokens"][target])] for row in rows]
    assert np.mean(all_l1) == pytest.approx(levels[target]["mean_l1"])


def test_complexity_section(evaluation):
    *_, report = evaluation
    cx = report["complexity"]
    target = report["adaptive"]["levels"][report["adaptive"]["target_level"]]
    assert cx["target_error"] == target["threshold"]
    complexity = [image["complexity"] for image in report["images"]]
    l1_fixed = [image["l1"][-1] for image in report["images"]]
    assert cx["fixed_budget"] == 96
    assert cx["spearman_l1_at_fixed_budget_vs_complexity"] == pytest.approx(spearman(l1_fixed, complexity))
    lengths = [image["chosen_tokens"][report["adaptive"]["target_level"]] for image in report["images"]]
    expected = spearman(lengths, complexity)
    if math.isnan(expected):
        assert cx["spearman_length_vs_complexity"] is None  # NaN (constant lengths) is written as null
    else:
        assert cx["spearman_length_vs_complexity"] == pytest.approx(expected)
    assert set(cx["spearman_l1_vs_complexity"]) == {"32", "64", "96"}


def test_figures_are_pngs(evaluation):
    *_, out_dir, report = evaluation
    assert set(report["figures"].values()) == set(FIGURES.values())
    for name in FIGURES.values():
        path = out_dir / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 200
            assert len(image.convert("L").getcolors(1 << 16) or ()) > 2  # not blank
    with Image.open(out_dir / "grid.png") as grid:  # 4 rows of input + 3 budgets + VQGAN, 256 px panels
        assert grid.width == 256 * 5 and grid.height > 4 * 256


def test_given_thresholds_and_max_images(converted_dirs, image_folder, tmp_path, capsys):
    code = main(["evaluate", str(image_folder), "--model", str(converted_dirs["A"]), "-o", str(tmp_path),
                 "--max-images", "1", "--max-tokens", "32", "--thresholds", "0.9,0.1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metadata"]["num_images"] == 1 and report["budgets"] == [32]
    assert report["adaptive"]["thresholds_source"] == "given"
    assert [level["threshold"] for level in report["adaptive"]["levels"]] == [0.1, 0.9]
    assert report["images"][0]["chosen_tokens"] == [32, 32]


def test_grid_spans_complexity(tok_a, image_folder, tmp_path):
    """With more images than grid rows, the grid shows the least and most complex ones (re-run after the pass)."""
    report = evaluate_folder(tok_a, image_folder, tmp_path, max_images=2, max_tokens=32, grid_images=1,
                                thresholds=[0.5], progress=False)
    by_complexity = sorted(report["images"], key=lambda row: row["complexity"])
    assert report["grid_images"] == [by_complexity[0]["file"]] != [report["images"][0]["file"]]
    assert report["metadata"]["command"] is None and report["metadata"]["model"] is None
    with Image.open(tmp_path / "grid.png") as grid:  # 1 row: input, 1 budget, VQGAN
        assert grid.width == 256 * 3 and 256 < grid.height < 2 * 256


@pytest.mark.parametrize("case", ["missing", "empty", "thresholds", "max_images", "max_tokens"])
def test_cli_user_errors(case, converted_dirs, image_folder, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    folder = {"missing": tmp_path / "nope", "empty": empty}.get(case, image_folder)
    extra = {"thresholds": ["--thresholds", "0.1,x"], "max_images": ["--max-images", "0"],
             "max_tokens": ["--max-tokens", "8"]}.get(case, [])
    code = main(["evaluate", str(folder), "--model", str(converted_dirs["A"]), "-o", str(tmp_path / "out"), *extra])
    _, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaptive-tokenizer: error: ") and "Traceback" not in err
    fragment = {"missing": "no such folder", "empty": "no image files", "thresholds": "--thresholds",
                "max_images": "positive integer", "max_tokens": "max_tokens"}[case]
    assert fragment in lines[0]


def test_sharpness_and_colour_per_budget(tok_a, tmp_path):
    """The fidelity columns of ``fixed`` are the ``metrics`` measures of the reconstructions over the images."""
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "a_colour.png")
    Image.fromarray(colour[..., 0]).convert("RGB").save(tmp_path / "b_grey.png")
    report = evaluate_folder(tok_a, tmp_path, tmp_path / "out", max_tokens=64, grid_images=1, progress=False)
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
    table = format_table(report)
    assert "sharpness" in table and "(1 greyscale)" in table
