"""The default model embedded in the package (``AdaptiveTokenizer.from_pretrained()`` with no argument): it loads
offline with its checksums verified, and on the evaluation photos (``evaluation/photos/``, other sources than the
training corpus) it behaves as its model card and the README say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from adaptive_tokenizer import AdaptiveTokenizer
from adaptive_tokenizer.config import DEFAULT_MODEL
from adaptive_tokenizer.evaluate import jpeg_complexity, l1_error, spearman
from adaptive_tokenizer.hub import load_manifest
from adaptive_tokenizer.image_io import list_image_files, load_images

ROOT = Path(__file__).parent.parent
PHOTOS = list_image_files(ROOT / "evaluation" / "photos")

pytestmark = pytest.mark.skipif(load_manifest().default is None,
                                reason="this version embeds no default model (tests/test_hub.py checks the error)")

# Mean L1 over the 11 evaluation photos at 32 and 256 tokens, as measured when the model was shipped (README table),
# with a margin for other CPUs' kernels.
MEASURED_L1_32, MEASURED_L1_256 = 0.0826, 0.0524
# The length rule's weight, selected on the corpus' held-out files (training/README.md), and the README's adaptive
# row on the evaluation photos: threshold, mean tokens, mean L1 (fixed 128 tokens: 0.0583), Spearman vs complexity.
LENGTH_FLOOR_WEIGHT = 0.78
ADAPTIVE_THRESHOLD, ADAPTIVE_MEAN_TOKENS, ADAPTIVE_L1, ADAPTIVE_SPEARMAN = 0.0226, 128.0, 0.0570, 0.628


@pytest.fixture(scope="module")
def tok() -> AdaptiveTokenizer:
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded: the weights are in the package
    try:
        return AdaptiveTokenizer.from_pretrained()
    finally:
        del os.environ["HF_HUB_OFFLINE"]


def test_default_model_is_the_default_architecture(tok):
    assert tok.config.length_floor_weight == LENGTH_FLOOR_WEIGHT  # chosen after training, not architecture
    config = tok.config.replace(length_floor_weight=DEFAULT_MODEL.length_floor_weight)
    assert config.replace(base=DEFAULT_MODEL.base) == DEFAULT_MODEL.replace(base=DEFAULT_MODEL.base)
    assert tok.config.base == DEFAULT_MODEL.base
    assert (tok.config.image_size, tok.max_tokens, tok.config.rollout) == (128, 256, "cached")


def test_quality_improves_with_every_budget(tok):
    _, errors = tok.reconstructions(PHOTOS)  # [11 photos, 8 budgets]
    mean = errors.mean(0)
    assert (mean[1:] < mean[:-1]).all(), mean  # strictly better at every larger budget
    assert mean[0] == pytest.approx(MEASURED_L1_32, abs=0.003)
    assert mean[-1] == pytest.approx(MEASURED_L1_256, abs=0.003)


def test_adaptive_length_beats_a_fixed_budget_and_follows_complexity(tok):
    """The README's adaptive row: at its threshold the photos take 128 tokens on average, reconstruct better than
    128 tokens each, and the longer lengths go to the more complex photos (Spearman >= 0.6)."""
    images = load_images(PHOTOS, tok.config.image_size)
    adaptive = tok.encode(images, halt_threshold=ADAPTIVE_THRESHOLD)
    fixed = tok.encode(images, budget=128)
    adaptive_l1 = l1_error(tok.decode(adaptive), images).mean().item()
    fixed_l1 = l1_error(tok.decode(fixed), images).mean().item()
    lengths = adaptive.num_tokens.double()
    assert lengths.mean().item() == ADAPTIVE_MEAN_TOKENS
    assert adaptive_l1 == pytest.approx(ADAPTIVE_L1, abs=0.0005) and adaptive_l1 < fixed_l1
    rho = spearman(lengths.numpy(), [jpeg_complexity(image) for image in images])
    assert rho == pytest.approx(ADAPTIVE_SPEARMAN, abs=0.001) and rho >= 0.6


def test_tokens_are_prefixes_and_independent_of_the_batch(tok):
    images = load_images(PHOTOS[:4], tok.config.image_size)
    full = tok.encode(images, budget=256)
    short = tok.encode(images, budget=64)
    alone = tok.encode(images[2:3], budget=256)
    for image in range(4):
        assert torch.equal(short.tokens[image], full.tokens[image][:64])
    assert torch.equal(alone.tokens[0], full.tokens[2])
    adaptive = tok.encode(images, halt_threshold=0.1)
    assert all(len(t) in range(32, 257, 32) for t in adaptive.tokens)
    assert torch.equal(adaptive.tokens[1], full.tokens[1][: len(adaptive.tokens[1])])


def test_quickstart_runs_on_the_default_model(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"),
                             str(ROOT / "evaluation" / "photos" / "chelsea.png")], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "budget 256: 256 tokens" in result.stdout and "adaptive (threshold" in result.stdout
    with Image.open(tmp_path / "quickstart_strip.png") as strip:  # input, 4 budgets, adaptive
        assert strip.width == 6 * 256  # panels enlarged to 256 px


def test_readme_quickstart_runs_as_written(tmp_path):
    """The first ```python block of the README's Quickstart, run from a folder that has the repository's
    ``evaluation/`` photos, writes its strip PNG."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quickstart", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "evaluation").symlink_to(ROOT / "evaluation")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "strip.png") as strip:  # 4 budgets + adaptive, 128 px each
        assert strip.width == 5 * 128
