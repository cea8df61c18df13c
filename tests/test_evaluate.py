"""``adaptive-tokenizer evaluate``: metrics, adaptive choices (checked against ``encode``), figures, report, CLI.

One evaluation runs per module (the tiny quantized model, 4 images, budgets up to 96 to stay fast); the tests read
its report and figures.
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

from adaptive_tokenizer import evaluate as ev
from adaptive_tokenizer.cli import main
from adaptive_tokenizer.image_io import load_images

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


# ---- metrics on known inputs ---------------------------------------------------------------------------------
def test_ssim_psnr_of_identical_images():
    x = torch.rand(2, 3, 32, 40)
    assert ev.ssim(x, x).tolist() == [1.0, 1.0]
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert ev.ssim(flat, flat).item() == 1.0
    # PSNR of identical images is capped (documented): 100 dB, so the report stays valid JSON
    assert ev.psnr(x, x).tolist() == [ev.PSNR_CAP_DB, ev.PSNR_CAP_DB]
    assert ev.l1_error(x, x).tolist() == [0.0, 0.0]


def test_psnr_l1_known_values():
    x = torch.zeros(1, 3, 8, 8)
    y = torch.full((1, 3, 8, 8), 0.1)
    assert ev.l1_error(x, y).item() == pytest.approx(0.1)
    assert ev.psnr(x, y).item() == pytest.approx(20.0)  # MSE 0.01


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
    assert ev.ssim(x, y).item() == pytest.approx(expected, abs=1e-5)
    assert -1 <= ev.ssim(x, 1 - x).item() < 0.5
    with pytest.raises(ValueError, match="at least 11x11"):
        ev.ssim(x[..., :8, :8], y[..., :8, :8])


def test_spearman_known_vectors():
    assert ev.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert ev.rankdata([3, 3, 3]).tolist() == [2.0, 2.0, 2.0]
    assert ev.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 70]) == pytest.approx(1.0)
    assert ev.spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties averaged: ranks a = [1, 2.5, 2.5, 4], b = [1, 2, 3, 4] -> Pearson = 4.5 / sqrt(4.5 * 5)
    assert ev.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    # ties in both: ranks [1, 2.5, 2.5, 4, 5.5, 5.5] and [3, 1.5, 4, 1.5, 5, 6] -> 9.75 / sqrt(16.5 * 17)
    assert ev.spearman([1, 2, 2, 3, 9, 9], [3, 1, 4, 1, 5, 9]) == pytest.approx(9.75 / math.sqrt(16.5 * 17))
    assert math.isnan(ev.spearman([1, 1, 1], [1, 2, 3]))  # a constant vector has no rank correlation
    assert math.isnan(ev.spearman([1], [2]))


def test_choose_iterations_rule():
    errors = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.6, 0.4], [0.1, 0.05, 0.01]])
    chosen = ev.choose_iterations(errors, [0.0, 0.3, 0.45])
    assert chosen.tolist() == [[2, 0, 2],   # nothing meets 0.0: lowest error (first on ties: image 1 -> 0)
                               [1, 0, 0],   # 0.3 meets float32(0.3), as in the rollout's float32 comparison
                               [1, 0, 0]]


def test_auto_thresholds_span_and_target():
    generator = torch.Generator().manual_seed(1)
    errors = (torch.rand(40, 8, generator=generator) * 0.2 + torch.linspace(0.1, 0, 8)).float()
    budgets = [32 * (i + 1) for i in range(8)]
    thresholds = ev.auto_thresholds(errors, budgets)
    assert thresholds == sorted(thresholds) and 3 <= len(thresholds) <= 6
    means = (torch.tensor(budgets, dtype=torch.float64)[ev.choose_iterations(errors, thresholds)]).mean(1).tolist()
    # the extremes of what any threshold can give: everything at 32, and every image at its lowest error
    lowest = torch.tensor(budgets, dtype=torch.float64)[errors.argmin(1)].mean().item()
    assert min(means) == 32 and max(means) == pytest.approx(lowest)
    # the ~128 level is as close to 128 as any threshold can get (a fine sweep finds nothing closer)
    sweep = torch.linspace(0, 0.35, 3501)
    all_means = torch.tensor(budgets, dtype=torch.float64)[ev.choose_iterations(errors, sweep)].mean(1)
    assert min(abs(m - 128) for m in means) <= (all_means - 128).abs().min().item() + 1e-9
    # thresholds are short decimals, not float noise
    assert all(len(repr(t)) <= 8 for t in thresholds)


def test_best_allocation_is_exact():
    """Against brute force over every allocation: the least summed error with at most the given mean length."""
    import itertools
    generator = torch.Generator().manual_seed(3)
    errors = torch.rand(5, 4, generator=generator) + torch.linspace(0.6, 0, 4)  # [5 images, 4 lengths]
    for units_per_image in (1, 1.4, 2, 2.5, 4):
        chosen = ev.best_allocation(errors, units_per_image)
        assert (chosen + 1).sum() <= units_per_image * 5
        best = min(sum(errors[i, k].item() for i, k in enumerate(ks))
                   for ks in itertools.product(range(4), repeat=5) if sum(ks) + 5 <= units_per_image * 5)
        assert errors[torch.arange(5), chosen].sum().item() == pytest.approx(best)
    # a fixed length is one of the allocations considered: never worse than it
    assert errors[torch.arange(5), ev.best_allocation(errors, 2)].mean() <= errors[:, 1].mean()
    # more lengths than the whole budget allows: the longest never fit
    assert ev.best_allocation(errors[:1], 2).item() == int(errors[0, :2].argmin())
    with pytest.raises(ValueError, match="at least 1"):
        ev.best_allocation(errors, 0.5)


def test_parse_thresholds():
    assert ev.parse_thresholds("0.1,0.05,0.1") == [0.05, 0.1]
    for bad in ("", "a", "0.1,-1", "nan", "0.1,,0.2"):
        with pytest.raises(ValueError, match="--thresholds"):
            ev.parse_thresholds(bad)


def test_nice_ticks():
    ticks, step = ev.nice_ticks(0, 0.53)
    assert step == 0.1 and ticks[0] == 0 and ticks[-1] == 0.5
    ticks, step = ev.nice_ticks(0, 1.0, 4)
    assert step == 0.25 and [ev.format_tick(t, step) for t in ticks] == ["0.00", "0.25", "0.50", "0.75", "1.00"]


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
    assert report["format"] == ev.REPORT_FORMAT
    meta = report["metadata"]
    assert meta["num_images"] == 4 and meta["folder"] == str(image_folder) and meta["model"] == str(converted_dirs["A"])
    assert meta["command"][:3] == ["adaptive-tokenizer", "evaluate", str(image_folder)]
    assert "--max-tokens" in meta["command"] and meta["elapsed_s"] > 0
    assert meta["model_summary"]["latent_kind"] == "quantized" and meta["config"]["codebook_size"] == 128
    budgets = report["budgets"]
    assert budgets == [32, 64, 96] and all(a < b for a, b in zip(budgets, budgets[1:]))
    assert [row["budget"] for row in report["fixed"]] == budgets
    assert [row["file"] for row in report["images"]] == sorted(NAMES)


def test_metric_ranges(evaluation):
    *_, report = evaluation
    rows = report["fixed"] + [report["base_ceiling"]]
    for row in rows:
        assert 0 <= row["l1"] <= 1 and 0 < row["psnr"] <= ev.PSNR_CAP_DB and -1 <= row["ssim"] <= 1
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
    assert row["l1"] == pytest.approx(ev.l1_error(pixels[0], targets).tolist(), abs=error_atol(tok_a))
    assert row["ssim"] == pytest.approx(ev.ssim(pixels[0], targets).tolist(), abs=1e-5)
    assert row["error_unclamped"] == pytest.approx(errors[0].tolist(), abs=error_atol(tok_a))
    with torch.inference_mode():
        base = tok_a.model.base
        ceiling = base.decode_ids(base.code_ids(base.encode(inputs))).clamp(0, 1)
    assert row["base"]["l1"] == pytest.approx(ev.l1_error(ceiling, inputs).item(), abs=base_error_atol(tok_a))
    assert row["complexity"] == pytest.approx(ev.jpeg_complexity(inputs[0]))


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


def test_paired_difference_counts_and_interval(evaluation):
    differences = torch.tensor([-0.02, -0.01, 0.0, 0.005, -0.03])
    pair = ev.paired_difference(differences, resamples=2000)
    assert (pair["better"], pair["worse"], pair["same"]) == (3, 1, 1)
    assert pair["mean"] == pytest.approx(-0.011)
    low, high = pair["bootstrap_95"]
    assert -0.03 <= low < pair["mean"] < high <= 0.005
    assert ev.paired_difference(differences, resamples=2000) == pair  # seeded
    *_, report = evaluation  # the report's numbers are those of its images
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
            assert ev.l1_error(decoded, inputs).tolist() == pytest.approx(chosen_l1, abs=error_atol(tok_a))
    all_l1 = [row["l1"][budgets.index(row["chosen_tokens"][target])] for row in rows]
    assert np.mean(all_l1) == pytest.approx(levels[target]["mean_l1"])


def test_complexity_section(evaluation):
    *_, report = evaluation
    cx = report["complexity"]
    target = report["adaptive"]["levels"][report["adaptive"]["target_level"]]
    assert cx["length_threshold"] == target["threshold"]
    complexity = [image["complexity"] for image in report["images"]]
    l1_fixed = [image["l1"][-1] for image in report["images"]]
    assert cx["fixed_budget"] == 96
    assert cx["spearman_l1_at_fixed_budget_vs_complexity"] == pytest.approx(ev.spearman(l1_fixed, complexity))
    lengths = [image["chosen_tokens"][report["adaptive"]["target_level"]] for image in report["images"]]
    expected = ev.spearman(lengths, complexity)
    if math.isnan(expected):
        assert cx["spearman_length_vs_complexity"] is None  # NaN (constant lengths) is written as null
    else:
        assert cx["spearman_length_vs_complexity"] == pytest.approx(expected)
    assert set(cx["spearman_l1_vs_complexity"]) == {"32", "64", "96"}


def test_figures_are_pngs(evaluation):
    *_, out_dir, report = evaluation
    assert set(report["figures"].values()) == set(ev.FIGURES.values())
    for name in ev.FIGURES.values():
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
    report = ev.evaluate_folder(tok_a, image_folder, tmp_path, max_images=2, max_tokens=32, grid_images=1,
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
