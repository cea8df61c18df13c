"""The command line: in-process through ``main([...])``, and once through ``python -m adaptive_tokenizer``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from adaptive_tokenizer import AdaptiveTokenizer, ModelConfig
from adaptive_tokenizer.cli import main
from adaptive_tokenizer.cli.common import output_names
from adaptive_tokenizer.serialization import TOKEN_FORMAT, load_token_file, save_token_file
from adaptive_tokenizer.tokenizer import EncodeResult

from .tolerances import decode_atol

FIXTURES = Path(__file__).parent / "fixtures"
HEADS = ["--encoder-heads", "4", "--decoder-heads", "4"]  # the tiny fixtures match no authors' preset
IMAGE_NAMES = ("img0.png", "img1.jpg", "img2.png")


def run(capsys, *args: object) -> tuple[int, str, str]:
    """``main`` on ``args`` (str()-ed) -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("adaptive-tokenizer: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


# ---- module fixtures: convert once, write images once, encode once -------------------------------------------
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny A (quantized, 128 codes) and B (continuous, 12-d) converted by the CLI (dynamic halting on)."""
    out = {}
    for variant in "AB":
        directory = tmp_path_factory.mktemp(f"model_{variant}")
        assert main(["convert", str(FIXTURES / f"alit_tiny_{variant}.pth"), str(directory), *HEADS]) == 0
        out[variant] = directory
    return out


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """A folder of the 3 reference images (PNG, JPEG, PNG) plus a file that is not an image."""
    folder = tmp_path_factory.mktemp("images")
    images = load_file(FIXTURES / "inputs.safetensors")["imgs_u8"]
    for name, image in zip(IMAGE_NAMES, images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def tokens_a(model_dirs, image_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "a.safetensors"
    assert main(["encode", "--model", str(model_dirs["A"]), str(image_dir), "-o", str(path), "--budget", "64"]) == 0
    return path


@pytest.fixture(scope="module")
def tokens_b(model_dirs, image_dir, tmp_path_factory) -> Path:
    """Continuous tokens, adaptive length (threshold 0.5 splits the 3 images), two batches."""
    path = tmp_path_factory.mktemp("tokens") / "b.safetensors"
    assert main(["encode", "--model", str(model_dirs["B"]), str(image_dir), "-o", str(path), "--max-tokens", "96",
                 "--halt-threshold", "0.5", "--batch-size", "2"]) == 0
    return path


# ---- convert -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, kind", [("A", "quantized (128 codes, 12-d)"), ("B", "continuous (12-d vectors)")])
def test_convert(capsys, tmp_path, variant, kind):
    code, out, err = run(capsys, "convert", FIXTURES / f"alit_tiny_{variant}.pth", tmp_path / "m", *HEADS,
                         "--no-dynamic-halting")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1
    assert kind in out and "32-256 tokens" in out and "dynamic halting off" in out
    config = ModelConfig.from_json(tmp_path / "m" / "config.json")
    assert config.latent_kind == kind.split()[0] and not config.dynamic_halting
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_convert_halting_confidence(capsys, tmp_path):
    code, out, _ = run(capsys, "convert", FIXTURES / "alit_tiny_A.pth", tmp_path, *HEADS, "--halting-confidence", "0.7")
    assert code == 0 and "p >= 0.7" in out
    assert ModelConfig.from_json(tmp_path / "config.json").dynamic_halting_confidence == 0.7


# ---- encode / token files ------------------------------------------------------------------------------------
def test_encode_budget_token_file(tokens_a, image_dir):
    sequences, sources = load_token_file(tokens_a)
    assert sources == [str(image_dir / name) for name in sorted(IMAGE_NAMES)]
    assert [tuple(s.shape) for s in sequences] == [(64,)] * 3
    assert all(s.dtype == torch.int64 and 0 <= int(s.min()) and int(s.max()) < 128 for s in sequences)
    raw = load_file(tokens_a)
    assert set(raw) == {"tokens", "num_tokens"}  # no errors without a threshold
    assert raw["tokens"].shape == (192,) and raw["num_tokens"].tolist() == [64, 64, 64]
    with safe_open(tokens_a, "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == TOKEN_FORMAT and metadata["latent_kind"] == "quantized"
    assert json.loads(metadata["sources"]) == sources


def test_encode_matches_library(tokens_a, model_dirs, image_dir):
    tok = AdaptiveTokenizer.from_pretrained(model_dirs["A"])
    expected = tok.encode(sorted(str(p) for p in image_dir.glob("img*")), budget=64)
    sequences, _ = load_token_file(tokens_a)
    assert all(torch.equal(a, b) for a, b in zip(sequences, expected.tokens))


def test_encode_halt_threshold_continuous(tokens_b):
    raw = load_file(tokens_b)
    lengths = raw["num_tokens"]
    assert lengths.dtype == torch.int64 and lengths.shape == (3,)
    assert all(n in (32, 64, 96) for n in lengths.tolist()) and len(set(lengths.tolist())) > 1
    assert raw["tokens"].dtype == torch.float32 and raw["tokens"].shape == (int(lengths.sum()), 12)
    assert raw["errors"].dtype == torch.float32 and raw["errors"].shape == (3,)
    sequences, sources = load_token_file(tokens_b)
    assert [len(s) for s in sequences] == lengths.tolist() and len(sources) == 3


def test_encode_summary_and_sources_as_given(capsys, model_dirs, image_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(image_dir)
    out_path = tmp_path / "sub" / "t.safetensors"  # missing parent folders are created
    code, out, err = run(capsys, "encode", "--model", model_dirs["A"], "img1.jpg", ".", "-o", out_path,
                         "--budget", "32")
    assert code == 0, err
    assert out.strip() == f"encoded 4 images: mean 32.0 tokens (min 32, max 32) -> {out_path}"
    assert load_token_file(out_path)[1] == ["img1.jpg", "img0.png", "img1.jpg", "img2.png"]
    assert os.listdir(out_path.parent) == ["t.safetensors"]  # no temporary file left


# ---- decode --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["A", "B"])
def test_decode_writes_pngs(capsys, model_dirs, tokens_a, tokens_b, tmp_path, variant):
    tokens = tokens_a if variant == "A" else tokens_b
    code, out, err = run(capsys, "decode", "--model", model_dirs[variant], tokens, "-o", tmp_path / "out",
                         "--batch-size", "2")
    assert code == 0, err
    assert out.strip() == f"decoded 3 images -> {tmp_path / 'out'}"
    assert sorted(os.listdir(tmp_path / "out")) == ["img0.png", "img1.png", "img2.png"]
    for name in ("img0.png", "img1.png", "img2.png"):
        with Image.open(tmp_path / "out" / name) as image:
            assert image.size == (256, 256) and image.mode == "RGB"


def test_decode_matches_library(capsys, model_dirs, tokens_a, tmp_path):
    assert run(capsys, "decode", "--model", model_dirs["A"], tokens_a, "-o", tmp_path)[0] == 0
    tok = AdaptiveTokenizer.from_pretrained(model_dirs["A"])
    expected = tok.decode(load_token_file(tokens_a)[0][:1])[0]
    written = torch.from_numpy(np.array(Image.open(tmp_path / "img0.png"))).permute(2, 0, 1) / 255
    # PNGs round to 1/255; the CLI decodes the 3 images in one batch, the library this one alone (tolerances.py)
    assert (written - expected).abs().max() <= 0.5 / 255 + decode_atol(tok)


def test_output_names_disambiguate():
    sources = ["a/x.png", "b/x.jpg", "x_1.png", "X.png", "", "../y.tif"]
    assert output_names(sources) == ["x.png", "x_1.png", "x_1_1.png", "X_2.png", "image_4.png", "y.png"]


# ---- reconstruct / info --------------------------------------------------------------------------------------
def test_reconstruct_strip(capsys, model_dirs, image_dir, tmp_path):
    strip_path = tmp_path / "strip.png"
    code, out, err = run(capsys, "reconstruct", "--model", model_dirs["A"], image_dir / "img1.jpg", "-o", strip_path)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [line.split(" tok")[0] for line in lines[:-1]] == [str(32 * i) for i in range(1, 9)]
    assert all("  L1 " in line for line in lines[:-1])
    with Image.open(strip_path) as strip:
        assert strip.width == 9 * 256 and 256 < strip.height < 256 + 40  # input + 8 budgets, a label band


def test_reconstruct_max_tokens(capsys, model_dirs, image_dir, tmp_path):
    code, _, err = run(capsys, "reconstruct", "--model", model_dirs["B"], image_dir / "img0.png", "-o",
                       tmp_path / "s.png", "--max-tokens", "64")
    assert code == 0, err
    with Image.open(tmp_path / "s.png") as strip:
        assert strip.width == 3 * 256


def test_info(capsys, model_dirs):
    code, out, err = run(capsys, "info", "--model", model_dirs["A"])
    assert code == 0, err
    config_text, counts_text = out.split("parameters:\n")
    assert ModelConfig.from_dict(json.loads(config_text)).latent_kind == "quantized"
    counts = AdaptiveTokenizer.from_pretrained(model_dirs["A"]).model.num_parameters()
    for part, count in counts.items():
        assert f"{part}" in counts_text and f"{count:,}" in counts_text
    assert set(counts) == {"base_tokenizer", "encoder", "decoder", "quantizer", "total"}


# ---- user errors ---------------------------------------------------------------------------------------------
USER_ERRORS = {
    "missing model dir": (["info", "--model", "{tmp}/nope"], "no model directory"),
    "missing image": (["encode", "--model", "{A}", "{tmp}/nope.png", "-o", "{tmp}/t.safetensors"], "nope.png"),
    "empty folder": (["encode", "--model", "{A}", "{tmp}", "-o", "{tmp}/t.safetensors"], "no image files"),
    "budget 0": (["encode", "--model", "{A}", "{images}", "-o", "{tmp}/t.safetensors", "--budget", "0"], "got 0"),
    "budget and max": (["encode", "--model", "{A}", "{images}", "-o", "{tmp}/t.safetensors", "--budget", "64",
                        "--max-tokens", "32"], "not allowed with"),
    "bad threshold": (["encode", "--model", "{A}", "{images}", "-o", "{tmp}/t.safetensors", "--halt-threshold",
                       "-1"], "halt_threshold"),
    "no predictor": (["encode", "--model", "{A}", "{images}", "-o", "{tmp}/t.safetensors", "--halt-threshold",
                      "0.5", "--length-rule", "predicted"], "fit-length-predictor"),
    "rule without target": (["encode", "--model", "{A}", "{images}", "-o", "{tmp}/t.safetensors", "--length-rule",
                             "search"], "give halt_threshold"),
    "not an int": (["encode", "--model", "{A}", "{images}", "-o", "{tmp}/t.safetensors", "--budget", "6x"],
                   "invalid int value"),
    "bad device": (["info", "--model", "{A}", "--device", "toaster"], "invalid device"),
    "bad batch size": (["decode", "--model", "{A}", "{tokens_b}", "-o", "{tmp}/o", "--batch-size", "0"],
                       "positive integer"),
    "bad dtype": (["info", "--model", "{A}", "--dtype", "int8"], "unknown dtype"),
    "corrupt token file": (["decode", "--model", "{A}", "{tmp}/corrupt.safetensors", "-o", "{tmp}/o"], "cannot read"),
    "not a token file": (["decode", "--model", "{A}", "{A}/model.safetensors", "-o", "{tmp}/o"], "not a token file"),
    "kind mismatch": (["decode", "--model", "{A}", "{tokens_b}", "-o", "{tmp}/o"], "continuous tokens"),
    "missing image (reconstruct)": (["reconstruct", "--model", "{A}", "{tmp}/nope.png", "-o", "{tmp}/s.png"],
                                    "image not found"),
    "heads unknown": (["convert", str(FIXTURES / "alit_tiny_A.pth"), "{tmp}/m"], "--encoder-heads"),
    "no command": ([], "COMMAND"),
}


@pytest.mark.parametrize("case", USER_ERRORS, ids=list(USER_ERRORS))
def test_user_errors(capsys, model_dirs, image_dir, tokens_b, tmp_path, case):
    args, fragment = USER_ERRORS[case]
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00\x01 definitely not safetensors")
    places = {"tmp": tmp_path, "A": model_dirs["A"], "images": image_dir, "tokens_b": tokens_b}
    code, out, err = run(capsys, *(a.format(**places) for a in args))
    assert_user_error(code, err, fragment)
    assert not (tmp_path / "t.safetensors").exists()  # nothing written on failure
    assert not list(tmp_path.glob(".t.safetensors*"))


def test_help_exits_zero(capsys):
    code, out, _ = run(capsys, "encode", "--help")
    assert code == 0 and "--halt-threshold" in out


# ---- the real entry point ------------------------------------------------------------------------------------
def _python_m(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a short job: avoid oversubscribing small machines
    return subprocess.run([sys.executable, "-m", "adaptive_tokenizer", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_python_m_entry_point(model_dirs, image_dir, tmp_path):
    ok = _python_m("encode", "--model", model_dirs["A"], image_dir, "-o", tmp_path / "t.safetensors", "--budget", "32")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("encoded 3 images: mean 32.0 tokens")
    assert [len(s) for s in load_token_file(tmp_path / "t.safetensors")[0]] == [32, 32, 32]

    bad = _python_m("encode", "--model", model_dirs["A"], image_dir, "-o", tmp_path / "u.safetensors", "--budget", "0")
    assert_user_error(bad.returncode, bad.stderr, "max_tokens/budget")
    assert not (tmp_path / "u.safetensors").exists()


# ---- all-or-nothing outputs ------------------------------------------------------------------------------------
def test_decode_checks_every_image_before_writing(capsys, model_dirs, tmp_path):
    """A bad id in image 18 of 20: named by its index in the file, and no PNG (nor the folder) is written."""
    ids = torch.randint(0, 128, (20, 32), generator=torch.Generator().manual_seed(0))
    ids[18, 5] = 999
    result = EncodeResult(tokens=list(ids), num_tokens=torch.full((20,), 32))
    save_token_file(tmp_path / "t.safetensors", result, [f"im{i}.png" for i in range(20)], "quantized")
    code, _, err = run(capsys, "decode", "--model", model_dirs["A"], tmp_path / "t.safetensors", "-o",
                       tmp_path / "out" / "pngs")
    assert_user_error(code, err, "token sequence 18", "[0, 128)", "t.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]  # no folder, no staging leftovers


def test_decode_into_an_existing_folder_adds_its_files(capsys, model_dirs, tokens_a, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "decode", "--model", model_dirs["A"], tokens_a, "-o", tmp_path)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["img0.png", "img1.png", "img2.png", "keep.txt"]


@pytest.mark.parametrize("command", ["encode", "reconstruct"])
def test_output_that_is_an_input_is_refused(capsys, model_dirs, image_dir, tmp_path, command):
    image = tmp_path / "c.png"
    image.write_bytes((image_dir / "img0.png").read_bytes())
    before = image.read_bytes()
    code, _, err = run(capsys, command, "--model", model_dirs["A"], image, "-o", image)
    assert_user_error(code, err, "is also an input")
    assert image.read_bytes() == before


# A full disk, for real: the subprocess may write files of at most FILE_LIMIT bytes (RLIMIT_FSIZE; a write past it
# fails with EFBIG), less than any of these outputs needs.
FULL_DISK = """
import resource, signal, sys
from adaptive_tokenizer.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["reconstruct", "decode"])
def test_full_disk_leaves_no_partial_output(model_dirs, image_dir, tokens_a, tmp_path, command):
    out = tmp_path / "out" / ("strip.png" if command == "reconstruct" else "pngs")
    source = image_dir / "img0.png" if command == "reconstruct" else tokens_a
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", FULL_DISK, command, "--model", str(model_dirs["A"]), str(source),
                           "-o", str(out)], capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert_user_error(done.returncode, done.stderr, "File too large")
    assert list(tmp_path.iterdir()) == []  # neither the file nor the folders made for it


def test_a_bug_shows_its_traceback_and_exits_1(model_dirs, image_dir, tmp_path, capsys, monkeypatch):
    """The split is by type: an internal ``TypeError`` (here injected into the rollout) is a bug, shown with its
    traceback and a request to report it, exit 1; the same command with a user's mistake is one line, exit 2."""
    import adaptive_tokenizer.tokenizer as tokenizer_module

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'Tensor' and 'NoneType'")

    monkeypatch.setattr(tokenizer_module, "rollout", broken)
    code = main(["encode", "--model", str(model_dirs["A"]), str(image_dir / IMAGE_NAMES[0]), "-o",
                 str(tmp_path / "t.safetensors"), "--budget", "32"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback (most recent call last)" in err and "in broken" in err
    assert "internal error" in err and "please report it" in err
    assert not (tmp_path / "t.safetensors").exists()
    code = main(["encode", "--model", str(model_dirs["A"]), str(tmp_path / "missing.png"), "-o",
                 str(tmp_path / "t.safetensors")])
    assert_user_error(code, capsys.readouterr().err, "missing.png")
    code = main(["encode", "--model", str(model_dirs["A"]), str(image_dir / IMAGE_NAMES[0]), "-o",
                 str(tmp_path / "t.safetensors"), "--budget", "7"])
    assert_user_error(code, capsys.readouterr().err, "rounded down")
