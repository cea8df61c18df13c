"""Hostile images: tiny files that decode into huge images, extreme aspect ratios, NaN pixels, broken files.

Each must end in a clear ValueError, quickly and within a small memory budget: the budget is enforced on a
subprocess (``RLIMIT_AS``: its address space may grow by at most ``MEMORY_BUDGET``), so a loader that tries to
allocate gigabytes fails the test with a MemoryError instead of exhausting the machine.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaptive_tokenizer import AdaptiveTokenizer, image_io
from adaptive_tokenizer.cli import main
from adaptive_tokenizer.image_io import load_images, open_image, pil_to_tensor

ROOT = Path(__file__).resolve().parents[1]
MEMORY_BUDGET = 300 * 2**20
TIME_BUDGET_S = 2.0


def png_bytes(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A valid greyscale PNG of zeros, written row by row (never held as an image): a few hundred bytes for
    1x200000, 48 kB for 20000x20000 at 1 bit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width * bit_depth + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    files = {"1x200000": png_bytes(1, 200000), "200000x1": png_bytes(200000, 1),
             "20000x20000": png_bytes(20000, 20000, bit_depth=1)}
    for name, data in files.items():
        (folder / f"{name}.png").write_bytes(data)
    return {name: folder / f"{name}.png" for name in files}


# The subprocess: load the default model, warm up, then cap the address space and encode the hostile input.
BUDGET_SCRIPT = """
import json, resource, sys, time
import torch
from adaptive_tokenizer import AdaptiveTokenizer, image_io
setting, kind, source = sys.argv[1], sys.argv[2], sys.argv[3]
for name, value in json.loads(setting).items():
    setattr(image_io, name, value)
tok = AdaptiveTokenizer.from_pretrained()
tok.encode(torch.rand(3, 40, 50), budget=32)  # warm up: threads, allocator arenas, lazy imports
def vm_bytes():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
value = torch.rand(*json.loads(source)) if kind == "tensor" else source  # a tensor input is the caller's memory
limit = vm_bytes() + int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    result = tok.encode(value, budget=32)
    outcome = "ok " + str(result.num_tokens.tolist())
except ValueError as err:
    outcome = "ValueError " + str(err)
elapsed = time.perf_counter() - start
rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
print(json.dumps({"outcome": outcome, "seconds": elapsed, "rss_growth": rss_growth}))
"""


def encode_within_budget(kind: str, source: str, **settings) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    done = subprocess.run([sys.executable, "-c", BUDGET_SCRIPT, json.dumps(settings), kind, source,
                           str(MEMORY_BUDGET)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,kind,limit", [
    ("1x200000", "file", "aspect ratio"),
    ("200000x1", "file", "aspect ratio"),
    ("20000x20000", "file", "MAX_IMAGE_PIXELS"),
    ("3x2x20000", "tensor", "aspect ratio"),
    ("3x9000x9000", "tensor", "MAX_IMAGE_PIXELS"),  # 970 MB of the caller's: encode must add little to it
])
def test_huge_inputs_fail_fast_within_a_memory_budget(hostile_files, name, kind, limit):
    source = str(hostile_files[name]) if kind == "file" else json.dumps([int(n) for n in name.split("x")])
    report = encode_within_budget(kind, source)
    assert report["outcome"].startswith("ValueError"), report
    assert limit in report["outcome"] and "raise" in report["outcome"], report  # names the limit and the way out
    assert report["seconds"] < TIME_BUDGET_S and report["rss_growth"] < MEMORY_BUDGET, report


def test_extreme_aspect_ratio_is_cropped_before_it_is_scaled(hostile_files):
    """With the aspect-ratio limit lifted, a 1x200000 PNG (a 25.6-megapixel column at 128 px wide if scaled
    first) encodes within the budget: only the window behind the centre crop is resampled."""
    report = encode_within_budget("file", str(hostile_files["1x200000"]), MAX_ASPECT_RATIO=10**9)
    assert report["outcome"] == "ok [32]", report
    assert report["seconds"] < TIME_BUDGET_S and report["rss_growth"] < MEMORY_BUDGET, report


@pytest.mark.parametrize("width,height", [(1000, 90), (90, 1000), (695, 7), (7, 695)])
def test_crop_first_matches_scale_first_up_to_rounding(width, height):
    rng = np.random.default_rng(width)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    cropped_first = pil_to_tensor(image, 64)
    new_long = int(64 * max(width, height) / min(width, height))
    size = (new_long, 64) if width > height else (64, new_long)
    offset = round((new_long - 64) / 2)
    box = (offset, 0, offset + 64, 64) if width > height else (0, offset, 64, offset + 64)
    scaled_first = np.asarray(image.resize(size, Image.BICUBIC).crop(box)).astype(np.int16)
    difference = np.abs(cropped_first.permute(1, 2, 0).mul(255).round().numpy().astype(np.int16) - scaled_first)
    # Pillow may run its two resampling passes in the other order on the window (8-bit rounding in between)
    assert difference.mean() < 0.5 and (difference > 1).mean() < 0.02


def test_limits_are_module_attributes_a_user_can_raise(monkeypatch):
    image = Image.new("RGB", (300, 2))
    with pytest.raises(ValueError, match="aspect ratio above the limit of 100:1"):
        pil_to_tensor(image, 16)
    monkeypatch.setattr(image_io, "MAX_ASPECT_RATIO", 200)
    assert pil_to_tensor(image, 16).shape == (3, 16, 16)
    monkeypatch.setattr(image_io, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(ValueError, match="600 pixels, above the limit of 500"):
        load_images(np.zeros((2, 300, 3), dtype=np.uint8), 16)


def test_decompression_bomb_is_a_value_error(tmp_path, monkeypatch):
    """Pillow's own DecompressionBombError (raised at open, above 2 x PIL.Image.MAX_IMAGE_PIXELS) is mapped."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(300, 300))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="too large to load.*MAX_IMAGE_PIXELS"):
        open_image(path)


def test_float_image_with_nan_is_rejected(tmp_path):
    values = np.random.default_rng(0).random((40, 50), dtype=np.float32)
    values[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        load_images(Image.fromarray(values), 32)
    values[3, 4] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_images(Image.fromarray(values), 32)
    path = tmp_path / "nan.tif"
    Image.fromarray(np.full((40, 50), np.nan, dtype=np.float32)).save(path)
    with pytest.raises(ValueError, match="NaN"):
        load_images(path, 32)


def test_broken_files_are_value_errors(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    for cut in (8, 40, len(data) // 2, len(data) * 3 // 4):
        broken = tmp_path / f"cut{cut}.png"
        broken.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cannot read"):
            load_images(broken, 32)


@pytest.mark.parametrize("value,message", [
    (torch.zeros(0, 3, 16, 16), "holds no images"),
    (Image.new("RGB", (0, 5)), "empty"),
])
def test_empty_images(value, message):
    with pytest.raises(ValueError, match=message):
        load_images(value, 16)


@pytest.mark.parametrize("name", ["1x200000", "200000x1", "20000x20000"])
def test_cli_reports_huge_images_in_one_line(capsys, hostile_files, tmp_path, name):
    code = main(["encode", str(hostile_files[name]), "-o", str(tmp_path / "t.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("adaptive-tokenizer: error: ")
    assert "limit" in err and not (tmp_path / "t.safetensors").exists()
    code = main(["reconstruct", str(hostile_files[name]), "-o", str(tmp_path / "s.png")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "limit" in err
    assert list(tmp_path.iterdir()) == []


def test_default_model_encodes_a_wide_but_acceptable_image():
    tok = AdaptiveTokenizer.from_pretrained()
    result = tok.encode(np.full((10, 900, 3), 128, dtype=np.uint8), budget=32)  # 90:1, under the limit
    assert result.num_tokens.tolist() == [32]
