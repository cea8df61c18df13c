"""``adaptive_tokenizer.evaluation.figures``: the plots drawn from a report by matplotlib (the ``eval`` extra), and
what ``evaluate`` does without matplotlib: report.json and grid.png, and one warning naming the extra."""

from __future__ import annotations

import builtins
import io
import json
import warnings

import pytest
from PIL import Image

from adaptive_tokenizer.evaluation import FIGURES, FiguresSkippedWarning, evaluate_folder, write_figures
from adaptive_tokenizer.evaluation.figures import PLOTS

from .evaluation_data import synthetic_report

INSTALL_LINE = 'pip install "adaptive-tokenizer[eval]"'


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Imports of matplotlib fail, as where the extra is not installed."""
    real_import = builtins.__import__

    def guarded_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded_import)


def _png(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("name", list(PLOTS))
def test_plots_are_drawn_from_the_report(name):
    image = _png(PLOTS[name](synthetic_report()))
    assert image.size == (800, 520)
    assert len(image.convert("L").getcolors(1 << 16) or ()) > 2  # not blank


def test_write_figures_writes_every_figure(tmp_path):
    grid = Image.new("RGB", (64, 32), "grey")
    written = write_figures(synthetic_report(), grid, tmp_path)
    assert written == FIGURES and list(written) == list(FIGURES)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(FIGURES.values())


def test_without_matplotlib_the_grid_is_written_and_one_warning_names_the_extra(no_matplotlib, tmp_path):
    with pytest.raises(ImportError, match=r"adaptive-tokenizer\[eval\]"):
        PLOTS["l1_vs_tokens"](synthetic_report())
    with pytest.warns(FiguresSkippedWarning) as caught:
        written = write_figures(synthetic_report(), Image.new("RGB", (64, 32)), tmp_path)
    assert written == {"grid": "grid.png"} and [path.name for path in tmp_path.iterdir()] == ["grid.png"]
    assert len(caught) == 1 and INSTALL_LINE in str(caught[0].message)


def test_evaluate_without_matplotlib_writes_the_report(no_matplotlib, tok_a, images_u8, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(images_u8[0].permute(1, 2, 0).numpy()).save(folder / "bird.png")
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluate_folder(tok_a, folder, out, max_tokens=32, thresholds=[0.5], progress=False)
    skipped = [w for w in caught if issubclass(w.category, FiguresSkippedWarning)]
    assert len(skipped) == 1 and INSTALL_LINE in str(skipped[0].message)
    assert skipped[0].filename == __file__  # attributed to the caller of evaluate_folder
    assert report["figures"] == {"grid": "grid.png"}
    assert sorted(path.name for path in out.iterdir()) == ["grid.png", "report.json"]
    assert json.loads((out / "report.json").read_text()) == report
