"""The example scripts run end to end on the tiny converted model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from adaptive_tokenizer import convert_checkpoint

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("model_A")
    convert_checkpoint(FIXTURES / "alit_tiny_A.pth", directory, encoder_heads=4, decoder_heads=4)
    return directory


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index, image in enumerate(load_file(FIXTURES / "inputs.safetensors")["imgs_u8"]):
        paths.append(folder / f"img{index}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


def run_example(name: str, *args: object, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a short job: avoid oversubscribing small machines
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_quickstart(model_dir, image_paths, tmp_path):
    result = run_example("quickstart.py", image_paths[1], "--model", model_dir, cwd=tmp_path)
    for budget in (32, 64, 128, 256):
        assert f"budget {budget:>3}: {budget} tokens" in result.stdout
    assert "adaptive (target 0.06)" in result.stdout
    with Image.open(tmp_path / "quickstart_strip.png") as strip:  # input, 4 budgets, adaptive
        assert strip.width == 6 * 256


def test_vlm_finetune_trains_packed_rows_and_generates_a_span(model_dir, image_paths, tmp_path):
    pytest.importorskip("transformers")
    result = run_example("vlm_finetune.py", *image_paths, "--model", model_dir, "--halt-threshold", "0.5",
                         "--steps", "3", "--width", "32", "--out", tmp_path / "gen.png", cwd=tmp_path)
    assert "3 rows; image tokens per photo: [" in result.stdout and "step    2  loss " in result.stdout
    with Image.open(tmp_path / "gen.png") as strip:  # the tokenized photo and the generated one
        assert strip.width == 2 * 256


def test_vlm_finetune_trains_on_a_tokenized_folder(model_dir, image_paths, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("pyarrow")
    from adaptive_tokenizer.cli import main

    tokens = tmp_path / "tokens"
    assert main(["tokenize", str(image_paths[0].parent), str(tokens), "--model", str(model_dir), "--budget", "32"]) == 0
    result = run_example("vlm_finetune.py", "--tokens", tokens, "--model", model_dir, "--steps", "2", "--width", "32",
                         "--out", tmp_path / "gen.png", cwd=tmp_path)
    assert "3 rows; image tokens per photo: [32, 32, 32]" in result.stdout
