"""Fuzz: random and broken inputs for every public entry point end in a documented error or a valid result.

Documented errors: ValueError, TypeError and FileNotFoundError (``ModelNotFoundError``, ``ChecksumError`` and
``ConversionError`` derive from them) from the API; exit status 2 with a one-line message from the command line.
Any other exception, a result that breaks the API's contract, a call slower than ``CALL_LIMIT_S``, or an
allocation past the address-space budget (``RLIMIT_AS``: a MemoryError) is a failure; failed CLI commands must
leave no new file behind. Seeded (the same cases every run); the whole file runs in well under a minute on
2 cores, using a small random model (tests/test_rollout.py) so that inputs that pass validation are cheap to encode.
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from adaptive_tokenizer import AdaptiveTokenizer, EncodeResult
from adaptive_tokenizer.cli import main
from adaptive_tokenizer.image_io import IMAGE_SUFFIXES
from adaptive_tokenizer.serialization import TOKEN_FORMAT

from .test_rollout import small_model

DOCUMENTED = (ValueError, TypeError, FileNotFoundError)
CALL_LIMIT_S = 10.0  # generous for a loaded 2-core machine; a hang or a huge resample takes far longer
MEMORY_HEADROOM = 2 * 2**30  # address space the fuzzed calls may add (torch's own mappings are already there)
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
         b"P6\n", b"P5\n"]


@contextmanager
def memory_budget():
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        used = int(next(line for line in status if line.startswith("VmSize")).split()[1]) * 1024
    limit = used + MEMORY_HEADROOM if hard == resource.RLIM_INFINITY else min(hard, used + MEMORY_HEADROOM)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class Outcomes:
    """Runs calls, records what was not a documented error or a valid result."""

    def __init__(self):
        self.failures: list[str] = []
        self.counts = {"ok": 0, "error": 0}

    def run(self, what: str, call, validate=None) -> bool:
        start = time.perf_counter()
        try:
            result = call()
        except DOCUMENTED as err:
            self.counts["error"] += 1
            if not str(err).strip():
                self.failures.append(f"{what}: {type(err).__name__} without a message")
            ok = False
        except Exception as err:  # noqa: BLE001 - the point of the test
            self.failures.append(f"{what}: {type(err).__name__}: {err}"[:400])
            ok = False
        else:
            self.counts["ok"] += 1
            if validate is not None:
                problem = validate(result)
                if problem:
                    self.failures.append(f"{what}: invalid result: {problem}")
            ok = True
        elapsed = time.perf_counter() - start
        if elapsed > CALL_LIMIT_S:
            self.failures.append(f"{what}: took {elapsed:.1f} s")
        return ok

    def check(self):
        assert not self.failures, f"{len(self.failures)} failures:\n" + "\n".join(self.failures[:30])


@pytest.fixture(scope="module")
def tok() -> AdaptiveTokenizer:
    return AdaptiveTokenizer(small_model())


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz_model")
    tok.save_pretrained(directory)
    return directory


def valid_encoding(tok, count=None):
    def validate(result):
        if not isinstance(result, EncodeResult) or (count is not None and len(result) != count):
            return f"not an EncodeResult of {count} images"
        for seq, n in zip(result.tokens, result.num_tokens.tolist()):
            if seq.dtype != torch.long or len(seq) != n or n % tok.tokens_per_iteration or not 0 < n <= tok.max_tokens:
                return f"bad sequence {seq.dtype} {tuple(seq.shape)} for {n} tokens"
            if seq.min() < 0 or seq.max() >= tok.config.codebook_size:
                return "ids out of range"
        return None
    return validate


def valid_pixels(tok):
    def validate(pixels):
        size = tok.config.image_size
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1:] != (3, size, size):
            return f"pixels of shape {getattr(pixels, 'shape', None)}"
        if not torch.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            return "pixels outside [0, 1]"
        return None
    return validate


# ---- input generators ----------------------------------------------------------------------------------------
def random_image(rng: random.Random) -> Image.Image:
    width, height = rng.choice([1, 2, 7, 33, 64]), rng.choice([1, 3, 16, 64, 90])
    array = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array)


def real_file_bytes(rng: random.Random) -> tuple[bytes, str]:
    fmt, suffix = rng.choice([("PNG", ".png"), ("JPEG", ".jpg"), ("GIF", ".gif"), ("BMP", ".bmp"), ("TIFF", ".tif"),
                              ("WEBP", ".webp"), ("PPM", ".ppm")])
    buffer = io.BytesIO()
    random_image(rng).save(buffer, format=fmt)
    return buffer.getvalue(), suffix


def broken_bytes(rng: random.Random) -> tuple[bytes, str]:
    """Random bytes (often behind a format's magic number), or a real image file truncated and/or bit-flipped."""
    if rng.random() < 0.5:
        return rng.choice(MAGIC) + rng.randbytes(rng.choice([0, 1, 10, 100, 2000])), rng.choice(IMAGE_SUFFIXES)
    data, suffix = real_file_bytes(rng)
    data = bytearray(data[: rng.randrange(len(data) + 1)] if rng.random() < 0.6 else data)
    for _ in range(rng.choice([0, 1, 5, 20])):
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data), suffix


def random_tensor(rng: random.Random) -> torch.Tensor:
    if rng.random() < 0.3:  # a valid image or batch, of any size
        shape = [rng.choice([1, 3]), rng.choice([1, 5, 64, 99]), rng.choice([1, 7, 64, 80])]
        shape = [rng.choice([1, 2]), *shape] if rng.random() < 0.5 else shape
        return torch.rand(shape, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    dtype = rng.choice([torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16,
                        torch.float32, torch.float64, torch.bool, torch.complex64])
    shape = [rng.choice([0, 1, 2, 3, 4, 5, 17, 64]) for _ in range(rng.choice([0, 1, 2, 3, 3, 4, 4, 5]))]
    if shape and rng.random() < 0.1:
        shape[-1] = rng.choice([1000, 20000])  # extreme aspect ratios
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    values = torch.rand(shape, generator=generator, dtype=torch.float64) * rng.choice([1, 1, 255, -3, 1e30])
    if values.numel() and rng.random() < 0.2:
        values.view(-1)[rng.randrange(values.numel())] = rng.choice([float("nan"), float("inf")])
    return values.to(dtype)


def random_pil(rng: random.Random) -> Image.Image:
    mode = rng.choice(["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F",
                       "I;16"])
    size = (rng.choice([0, 1, 5, 40, 300]), rng.choice([0, 1, 6, 40]))
    if mode == "F" and 0 not in size:
        values = np.random.default_rng(rng.randrange(2**32)).random(size[::-1], dtype=np.float32)
        values.flat[0] = rng.choice([0.5, np.nan, np.inf, -1e9, 1e9])
        return Image.fromarray(values)
    return Image.new(mode, size)


def random_array(rng: random.Random):
    kind = rng.random()
    if kind < 0.15:
        return np.array([None, "x"], dtype=object)
    dtype = rng.choice([np.uint8, np.uint8, np.uint16, np.float32, np.float64, np.bool_, np.int64])
    shape = [rng.choice([0, 1, 3, 4, 20, 64]) for _ in range(rng.choice([0, 1, 2, 3, 3, 4]))]
    return (np.random.default_rng(rng.randrange(2**32)).random(shape) * 300).astype(dtype)


def random_number(rng: random.Random):
    return rng.choice([None, None, 0, 1, 8, 16, 24, 32, 33, -8, 10**12, 8.0, 0.05, -0.1, float("nan"), float("inf"),
                       True, "16", np.int64(16), np.float32(0.05), torch.tensor(0.05), torch.tensor([16]), [16], 1j])


def random_tokens(rng: random.Random):
    kind = rng.random()
    if kind < 0.1:
        return rng.choice(["tokens", None, 3, [[1, 2]], {"a": 1}, [], (), [None]])
    if kind < 0.3:
        return [random_tensor(rng) for _ in range(rng.randrange(4))]
    if kind < 0.45:
        length = rng.choice([0, 7, 8, 16, 40])
        ids = torch.randint(-2, 40, (rng.choice([1, 2]), length), generator=torch.Generator().manual_seed(rng.randrange(99)))
        return EncodeResult(tokens=list(ids), num_tokens=torch.full((len(ids),), length))
    if kind < 0.6:
        return random_array(rng)
    if kind < 0.8:  # mostly valid ids, of any integer dtype
        dtype = rng.choice([torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
        shape = rng.choice([(8,), (16,), (2, 8), (3, 32), (40,), (1, 0)])
        return torch.randint(0, 32, shape, generator=torch.Generator().manual_seed(rng.randrange(99))).to(dtype)
    return random_tensor(rng)


# ---- the tests -------------------------------------------------------------------------------------------------
def test_fuzz_encode_files(tok, tmp_path):
    rng, outcomes = random.Random(17), Outcomes()
    with memory_budget():
        for index in range(300):
            data, suffix = broken_bytes(rng)
            path = tmp_path / f"f{index}{suffix}"
            path.write_bytes(data)
            outcomes.run(f"encode file {index} ({len(data)} bytes, {data[:12]!r})",
                         lambda: tok.encode(path, budget=8), valid_encoding(tok, 1))
    outcomes.check()
    assert outcomes.counts["ok"] >= 10 and outcomes.counts["error"] >= 150, outcomes.counts


def test_fuzz_encode_in_memory_inputs_and_arguments(tok):
    rng, outcomes = random.Random(18), Outcomes()
    makers = [random_tensor, random_pil, random_array,
              lambda r: r.choice([None, 3, "", b"bytes", [], [None], {}, Path("/nonexistent/x.png"), 1.5])]
    with memory_budget():
        for index in range(250):
            images = rng.choice(makers)(rng)
            if rng.random() < 0.15:
                images = [images, rng.choice(makers)(rng)]
            kwargs = {"max_tokens": random_number(rng) if rng.random() < 0.3 else rng.choice([None, 8, 16, 32]),
                      "halt_threshold": random_number(rng) if rng.random() < 0.3 else rng.choice([None, 0.1, 0.3])}
            if rng.random() < 0.5:
                kwargs["length_rule"] = rng.choice(["exact", "search", "predicted", "bogus", 3, None])
            kwargs = {k: v for k, v in kwargs.items() if v is not None or rng.random() < 0.5}
            outcomes.run(f"encode {index}: {type(images).__name__} {getattr(images, 'shape', '')} "
                         f"{getattr(images, 'dtype', getattr(images, 'mode', ''))} {kwargs}",
                         lambda: tok.encode(images, **kwargs), valid_encoding(tok))
    outcomes.check()
    assert outcomes.counts["ok"] >= 10, outcomes.counts


def test_fuzz_decode(tok):
    rng, outcomes = random.Random(19), Outcomes()
    with memory_budget():
        for index in range(250):
            tokens = random_tokens(rng)
            outcomes.run(f"decode {index}: {type(tokens).__name__} {getattr(tokens, 'shape', '')} "
                         f"{getattr(tokens, 'dtype', '')}", lambda: tok.decode(tokens), valid_pixels(tok))
    outcomes.check()
    assert outcomes.counts["ok"] >= 10, outcomes.counts


def test_fuzz_from_pretrained(model_dir, tmp_path):
    rng, outcomes = random.Random(20), Outcomes()
    config, weights = (model_dir / "config.json").read_bytes(), (model_dir / "model.safetensors").read_bytes()
    with memory_budget():
        for index in range(60):
            choice = rng.random()
            if choice < 0.35:
                name = rng.choice(["", ".", "org/name", "org/name@v1", "a/b/c", "../nope", "x" * 300, "alit-nope",
                                   "org/na me", "\u00e9/\u00e8", "with\x00nul", "org/name@", "@rev"])
            else:  # a directory with damaged files
                name = tmp_path / f"m{index}"
                name.mkdir()
                broken_config = rng.choice([config, config[: rng.randrange(len(config))], rng.randbytes(50),
                                            json.dumps({**json.loads(config), "image_size": rng.choice([-1, 7, "x",
                                                                                                       None])}).encode(),
                                            b"[]", b"{}"])
                broken_weights = rng.choice([weights, weights[: rng.randrange(len(weights))], rng.randbytes(100),
                                             weights[:8] + rng.randbytes(200)])
                (name / "config.json").write_bytes(broken_config)
                if rng.random() < 0.9:
                    (name / "model.safetensors").write_bytes(broken_weights)
            kwargs = rng.choice([{}, {"dtype": rng.choice(["bf16", "int8", torch.float16, 3, "float64"])},
                                 {"device": rng.choice(["cpu", "toaster", "cuda:7", 3, "meta"])},
                                 {"revision": "main"}])
            outcomes.run(f"from_pretrained {index}: {name!r} {kwargs}",
                         lambda: AdaptiveTokenizer.from_pretrained(name, local_files_only=True,
                                                                   cache_dir=tmp_path / "hub_cache", **kwargs))
    outcomes.check()


def test_fuzz_cli(capsys, tok, model_dir, tmp_path):
    rng, outcomes = random.Random(21), Outcomes()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    files = []
    for index in range(12):
        data, suffix = broken_bytes(rng) if index % 3 else real_file_bytes(rng)
        files.append(inputs / f"i{index}{suffix}")
        files[-1].write_bytes(data)
    token_files = []
    for index in range(12):
        path = inputs / f"t{index}.safetensors"
        tensors = {"tokens": random_tokens(rng) if index % 2 else torch.randint(0, 32, (16,)),
                   "num_tokens": rng.choice([torch.tensor([8, 8]), torch.tensor([16]), torch.tensor([-8, 24]),
                                             torch.tensor([8.0, 8.0]), torch.tensor([[16]])])}
        tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        metadata = rng.choice([{"format": TOKEN_FORMAT, "latent_kind": "quantized", "sources": '["a.png", "b.png"]'},
                               {"format": TOKEN_FORMAT, "latent_kind": "quantized", "sources": '["a.png"]'},
                               {"format": TOKEN_FORMAT, "latent_kind": "vectors", "sources": "[1]"},
                               {"format": "other"}])
        data = save(tensors, metadata=metadata) if tensors else b""
        path.write_bytes(data[: rng.choice([len(data), len(data) // 2])])
        token_files.append(path)
    before = set(inputs.iterdir())
    flags = ["--budget", "--max-tokens", "--halt-threshold", "--batch-size", "--length-rule", "--dtype",
             "--device", "--bogus"]
    values = ["8", "0", "-1", "nan", "1e9", "x", "bf16", "cpu", "toaster", ""]
    with memory_budget():
        for index in range(80):
            out = tmp_path / f"out{index}" / rng.choice(["t.safetensors", "dir", "s.png"])
            command = rng.choice(["encode", "decode", "reconstruct", "info", "convert", "models", "nonsense"])
            args = {"encode": ["encode", "--model", model_dir, *rng.sample(files, rng.choice([1, 2])), "-o", out],
                    "decode": ["decode", "--model", model_dir, rng.choice(token_files), "-o", out],
                    "reconstruct": ["reconstruct", "--model", model_dir, rng.choice(files), "-o", out],
                    "info": ["info", "--model", rng.choice([model_dir, rng.choice(files), inputs])],
                    "convert": ["convert", rng.choice(files + token_files), out],
                    "models": ["models", "--manifest", rng.choice(files)],
                    "nonsense": [rng.choice(values)]}[command]
            for _ in range(rng.choice([0, 0, 1, 2])):
                args += [rng.choice(flags), rng.choice(values)]
            argv = [str(a) for a in args]

            def call():
                code = main(argv)
                err = capsys.readouterr().err
                if code not in (0, 2):
                    raise AssertionError(f"exit status {code}")
                if code == 2:
                    lines = err.strip().splitlines()
                    if len(lines) != 1 or not lines[0].startswith("adaptive-tokenizer: error: "):
                        raise AssertionError(f"error output {err!r}")
                    if (tmp_path / f"out{index}").exists():
                        raise AssertionError("a failed command left output behind")
                return code

            outcomes.run(f"cli {argv}", call)
    outcomes.check()
    assert set(inputs.iterdir()) == before  # no input was overwritten or removed, nothing written beside them
    assert outcomes.counts["ok"] >= 80
