"""Public API: encode/decode contracts, budgets, adaptive length, determinism, input validation."""

import numpy as np
import pytest
import torch
from PIL import Image

from adaptive_tokenizer import AdaptiveTokenizer, EncodeResult

from .tolerances import base_error_atol, decode_atol, error_atol


def count_iterations(tok):
    """Count encoder passes (one per rollout iteration) through a forward hook."""
    calls = []
    handle = tok.model.encoder.transformer.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


# ---- encode: inputs ------------------------------------------------------------------------------------------
def test_every_input_kind_gives_the_same_tokens(tok_a, images, images_u8, tmp_path):
    array = images_u8[0].permute(1, 2, 0).numpy()
    path = tmp_path / "img.png"
    Image.fromarray(array).save(path)
    expected = tok_a.encode(images[0], budget=64).tokens[0]
    for source in (str(path), path, Image.open(path), array, images[0], images[:1], images_u8[0], [images[0]]):
        assert torch.equal(tok_a.encode(source, budget=64).tokens[0], expected)


def test_list_of_mixed_inputs_is_one_batch(tok_a, images, images_u8):
    pil = Image.fromarray(images_u8[1].permute(1, 2, 0).numpy())
    result = tok_a.encode([images[0], pil, images[2:3]], budget=32)
    assert len(result) == 3
    assert torch.equal(torch.stack(result.tokens), torch.stack(tok_a.encode(images, budget=32).tokens))


@pytest.mark.parametrize("bad,message", [
    (torch.rand(3, 32, 32) * 2, "in \\[0, 1\\]"),
    (torch.full((3, 8, 8), float("nan")), "in \\[0, 1\\]"),
    (torch.zeros(4, 32, 32), "3xHxW"),
    (torch.zeros(2, 2, 3, 8, 8), "3xHxW"),
    (torch.zeros(3, 8, 8, dtype=torch.int32), "float"),
    (np.zeros((8, 8, 3), dtype=np.float32), "uint8"),
    (np.zeros((8, 8, 5), dtype=np.uint8), "HxW"),
    ([], "no images"),
])
def test_bad_images_are_rejected_clearly(tok_a, bad, message):
    with pytest.raises(ValueError, match=message):
        tok_a.encode(bad)


def test_unsupported_type_and_missing_file(tok_a, tmp_path):
    with pytest.raises(TypeError, match="accepted"):
        tok_a.encode(12)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        tok_a.encode(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        tok_a.encode(tmp_path / "junk.png")


# ---- encode: budgets -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget,iterations", [(32, 1), (64, 2), (100, 3), (255, 7), (256, 8), (None, 8)])
def test_budget_runs_only_the_iterations_it_needs(tok_a, images, budget, iterations):
    calls, handle = count_iterations(tok_a)
    try:
        result = tok_a.encode(images[:2], budget=budget)
    finally:
        handle.remove()
    assert len(calls) == iterations
    assert result.num_tokens.tolist() == [32 * iterations] * 2
    assert [len(t) for t in result.tokens] == [32 * iterations] * 2
    assert result.errors is None


def test_max_tokens_and_budget_are_aliases(tok_a, images):
    a = tok_a.encode(images[0], max_tokens=96)
    b = tok_a.encode(images[0], budget=96)
    c = tok_a.encode(images[0], max_tokens=96, budget=96)
    assert torch.equal(a.tokens[0], b.tokens[0]) and torch.equal(a.tokens[0], c.tokens[0])
    with pytest.raises(ValueError, match="alias"):
        tok_a.encode(images[0], max_tokens=64, budget=96)


@pytest.mark.parametrize("budget", [0, 31, 257, -32, 64.0, True])
def test_out_of_range_budgets_are_rejected(tok_a, images, budget):
    with pytest.raises(ValueError, match="max_tokens"):
        tok_a.encode(images[0], budget=budget)


@pytest.mark.parametrize("threshold", [-0.1, float("nan"), "0.1", True])
def test_bad_halt_threshold_is_rejected(tok_a, images, threshold):
    with pytest.raises(ValueError, match="halt_threshold"):
        tok_a.encode(images[0], halt_threshold=threshold)


# ---- encode: adaptive length ---------------------------------------------------------------------------------
def test_adaptive_length_is_decided_per_image(tok_a, images):
    # Image 2's errors (~0.38-0.39) are far below images 0/1 (~0.79-0.82): at 0.5 it stops after one iteration,
    # the others never meet it and take their lowest-error length.
    batch = tok_a.encode(images, halt_threshold=0.5)
    for index in range(3):
        alone = tok_a.encode(images[index], halt_threshold=0.5)
        assert batch.num_tokens[index] == alone.num_tokens[0]
        assert torch.equal(batch.tokens[index], alone.tokens[0])
        assert batch.errors[index] == pytest.approx(alone.errors[0].item(), abs=error_atol(tok_a))
    assert batch.num_tokens.tolist() == [128, 128, 32]
    assert batch.errors[2] <= 0.5 < batch.errors[0]


def test_finished_images_stop_iterating(tok_a, images):
    calls, handle = count_iterations(tok_a)
    try:
        everyone_done = tok_a.encode(images, halt_threshold=10.0)
    finally:
        handle.remove()
    assert len(calls) == 1 and everyone_done.num_tokens.tolist() == [32, 32, 32]
    # With max_tokens the choice is restricted to the first iterations.
    capped = tok_a.encode(images, halt_threshold=0.0, max_tokens=64)
    assert capped.num_tokens.max() <= 64


def test_errors_are_the_reconstruction_errors_of_the_returned_tokens(tok_a, images):
    result = tok_a.encode(images, halt_threshold=0.5, max_tokens=96)
    pixels_unclamped_error = result.errors
    decoded = tok_a.decode(result)
    clamped_error = (decoded - images).abs().mean(dim=(1, 2, 3))
    # decode clamps to [0, 1], which can only bring pixels closer to the [0, 1] input.
    assert (clamped_error <= pixels_unclamped_error + 1e-6).all()


# ---- determinism ---------------------------------------------------------------------------------------------
def test_same_tokens_across_runs_and_batch_compositions(tok_a, images):
    torch.manual_seed(0)
    others = torch.rand(7, 3, 256, 256)
    for index in range(3):
        alone = tok_a.encode(images[index], budget=256).tokens[0]
        assert torch.equal(tok_a.encode(images[index], budget=256).tokens[0], alone)  # run to run
        batch = torch.cat([others[:index], images[index : index + 1], others[index:]])  # a batch of 8
        assert torch.equal(tok_a.encode(batch, budget=256).tokens[index], alone)
    # Adaptive length in a batch of 8 (capped at 64 tokens to keep the test fast: pixel decodes dominate).
    alone = tok_a.encode(images[2], halt_threshold=0.5, max_tokens=64)
    batch = tok_a.encode(torch.cat([others[:5], images, others[5:]])[:8], halt_threshold=0.5, max_tokens=64)
    assert torch.equal(batch.tokens[7], alone.tokens[0]) and batch.num_tokens[7] == alone.num_tokens[0]


def test_batch_size_does_not_change_results(converted_dirs, images):
    small = AdaptiveTokenizer.from_pretrained(converted_dirs["A"])
    small.batch_size = 1
    big = AdaptiveTokenizer.from_pretrained(converted_dirs["A"])
    a = small.encode(images, halt_threshold=0.5, max_tokens=96)
    b = big.encode(images, halt_threshold=0.5, max_tokens=96)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert a.num_tokens.tolist() == b.num_tokens.tolist()


# ---- result helpers ------------------------------------------------------------------------------------------
def test_padded_gives_ids_and_attention_mask():
    result = EncodeResult([torch.tensor([5, 6, 7]), torch.tensor([9])], torch.tensor([3, 1]))
    ids, mask = result.padded(pad_id=-1)
    assert ids.tolist() == [[5, 6, 7], [9, -1, -1]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]


def test_padded_continuous_tokens(tok_b, images):
    result = tok_b.encode(images, halt_threshold=0.5, max_tokens=64)
    vectors, mask = result.padded(pad_id=0.0)
    assert vectors.shape == (3, int(result.num_tokens.max()), 12)
    assert mask.sum(1).tolist() == result.num_tokens.tolist()


# ---- decode --------------------------------------------------------------------------------------------------
def test_decode_accepts_every_token_form(tok_a, images):
    result = tok_a.encode(images, halt_threshold=0.5, max_tokens=96)  # lengths 96, 96, 32
    from_result = tok_a.decode(result)
    assert from_result.shape == (3, 3, 256, 256) and from_result.dtype == torch.float32
    assert 0 <= from_result.min() and from_result.max() <= 1
    assert torch.equal(tok_a.decode(list(result.tokens)), from_result)
    # Pixels are floats: convolution kernels may round differently for another batch size (tests/tolerances.py).
    tol = decode_atol(tok_a)
    torch.testing.assert_close(tok_a.decode(result.tokens[2]), from_result[2:], atol=tol, rtol=0)
    torch.testing.assert_close(tok_a.decode(torch.stack(result.tokens[:2])), from_result[:2], atol=tol, rtol=0)
    torch.testing.assert_close(tok_a.decode(result.tokens[0].numpy()), from_result[:1], atol=tol, rtol=0)
    torch.testing.assert_close(tok_a.decode([result.tokens[2].to(torch.int32)]), from_result[2:], atol=tol, rtol=0)
    for dtype in (torch.uint8, torch.int8, torch.int16):  # small integer dtypes hold ids below their maximum
        small = [t.clamp(max=torch.iinfo(dtype).max).to(dtype) for t in result.tokens]
        expected = tok_a.decode([t.to(torch.long) for t in small])
        assert torch.equal(tok_a.decode(small), expected), dtype


def test_decode_continuous_tokens(tok_b, images):
    result = tok_b.encode(images, budget=64)
    pixels = tok_b.decode(result)
    assert pixels.shape == (3, 3, 256, 256)
    torch.testing.assert_close(tok_b.decode(torch.stack(result.tokens)), pixels, atol=decode_atol(tok_b), rtol=0)
    with pytest.raises(ValueError, match="float vectors"):
        tok_b.decode(torch.zeros(64, dtype=torch.long))
    with pytest.raises(ValueError, match="float tensor"):
        tok_b.decode([torch.zeros(64, 12, dtype=torch.long)])
    with pytest.raises(ValueError, match="float tensor"):
        tok_b.decode(torch.zeros(64, 7))
    with pytest.raises(ValueError, match="NaN"):
        tok_b.decode(torch.full((32, 12), float("nan")))


@pytest.mark.parametrize("tokens,message", [
    (torch.full((32,), 128), "\\[0, 128\\)"),
    (torch.full((32,), -1), "\\[0, 128\\)"),
    (torch.zeros(288, dtype=torch.long), "32 to 256"),
    (torch.zeros(40, dtype=torch.long), "multiples of 32"),
    (torch.zeros(0, dtype=torch.long), "multiples of 32"),
    (torch.zeros(32), "integer"),
    (torch.zeros(32, dtype=torch.bool), "integer"),
    (torch.zeros(2, 2, 32, dtype=torch.long), "dims"),
    ([], "no token"),
])
def test_decode_rejects_bad_tokens(tok_a, tokens, message):
    with pytest.raises(ValueError, match=message):
        tok_a.decode(tokens)


def test_decode_rejects_non_tensors(tok_a):
    with pytest.raises(TypeError):
        tok_a.decode("tokens")
    with pytest.raises(TypeError):
        tok_a.decode([[1, 2, 3]])


# ---- loading -------------------------------------------------------------------------------------------------
def test_from_pretrained_errors(tmp_path, converted_dirs):
    # (from_pretrained() with no argument: tests/test_default_model.py, or tests/test_hub.py when none is embedded)
    with pytest.raises(FileNotFoundError, match="no model directory"):
        AdaptiveTokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        AdaptiveTokenizer.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((converted_dirs["A"] / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="safetensors"):
        AdaptiveTokenizer.from_pretrained(broken)
    # Weights that do not fit the config: the error names the tensors.
    (broken / "model.safetensors").write_bytes((converted_dirs["B"] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="quantizer.codebook"):
        AdaptiveTokenizer.from_pretrained(broken)


def test_save_pretrained_round_trip(tok_a, images, tmp_path):
    tok_a.save_pretrained(tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    copy = AdaptiveTokenizer.from_pretrained(tmp_path / "copy")
    assert copy.config == tok_a.config
    assert torch.equal(copy.encode(images[0], budget=64).tokens[0], tok_a.encode(images[0], budget=64).tokens[0])


def test_bfloat16_on_cpu_and_dtype_errors(converted_dirs, images):
    tok = AdaptiveTokenizer.from_pretrained(converted_dirs["A"], dtype="bf16")
    assert tok.dtype == torch.bfloat16
    result = tok.encode(images[:1], budget=64)  # one image: CPUs without native bfloat16 emulate it (slow)
    assert result.tokens[0].dtype == torch.long and len(result.tokens[0]) == 64
    assert tok.decode(result).dtype == torch.float32
    with pytest.raises(ValueError, match="not supported on cpu"):
        AdaptiveTokenizer.from_pretrained(converted_dirs["A"], dtype=torch.float16)
    with pytest.raises(ValueError, match="unknown dtype"):
        AdaptiveTokenizer.from_pretrained(converted_dirs["A"], dtype="int8")


@pytest.mark.parametrize("threshold", [np.float32(0.5), np.float64(0.5), np.int64(1), torch.tensor(0.5),
                                       torch.tensor(0.5, dtype=torch.float16), 0.5, 1])
def test_halt_threshold_accepts_any_real_number(tok_a, images, threshold):
    expected = tok_a.encode(images[2], halt_threshold=float(threshold), max_tokens=64)
    result = tok_a.encode(images[2], halt_threshold=threshold, max_tokens=64)
    assert result.num_tokens.tolist() == expected.num_tokens.tolist()


@pytest.mark.parametrize("threshold", [np.bool_(True), np.float32("nan"), torch.tensor(-0.5), torch.tensor([0.5]),
                                       np.array([0.5]), float("inf"), 1j, "0.5"])
def test_halt_threshold_rejects_what_is_not_a_non_negative_number(tok_a, images, threshold):
    with pytest.raises(ValueError, match="halt_threshold must be a non-negative number"):
        tok_a.encode(images[0], halt_threshold=threshold)


def test_non_finite_model_output_is_a_clear_error(converted_dirs, images):
    """Weights that overflow give NaN reconstructions: the length choice says so instead of crashing."""
    tok = AdaptiveTokenizer.from_pretrained(converted_dirs["A"])
    with torch.no_grad():
        tok.model.base.decoder.conv_out.bias.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        tok.encode(images, halt_threshold=0.05, max_tokens=64)


def test_non_finite_weights_are_refused_at_load(converted_dirs, tmp_path):
    from safetensors.torch import load_file, save_file
    directory = tmp_path / "nan_model"
    directory.mkdir()
    (directory / "config.json").write_text((converted_dirs["A"] / "config.json").read_text())
    weights = load_file(converted_dirs["A"] / "model.safetensors")
    weights["decoder.norm_pre.weight"][0] = float("nan")
    save_file(weights, directory / "model.safetensors")
    with pytest.raises(ValueError, match=r"NaN or infinite values in \['decoder.norm_pre.weight'\]"):
        AdaptiveTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("device", ["toaster", "cuda:7", "meta", 3, "mps"])
def test_unavailable_device_is_a_value_error(converted_dirs, device):
    if device == "mps" and torch.backends.mps.is_available():
        device = "toaster"
    with pytest.raises(ValueError, match="device"):
        AdaptiveTokenizer.from_pretrained(converted_dirs["A"], device=device)


# ---- torch semantics: .to(), per-call batch size, streaming inputs ---------------------------------------------
def small_tokenizer() -> AdaptiveTokenizer:
    from .test_length_rules import tokenizer

    return tokenizer("cached", False, predictor=False)


def test_to_changes_only_what_it_is_given():
    tok = small_tokenizer()
    assert (tok.device.type, tok.dtype) == ("cpu", torch.float32)
    assert tok.to(dtype=torch.bfloat16) is tok and (tok.device.type, tok.dtype) == ("cpu", torch.bfloat16)
    tok.to("cpu")
    assert tok.dtype == torch.bfloat16  # the dtype left out stays
    tok.float()
    assert tok.dtype == torch.float32 and tok.bfloat16().dtype == torch.bfloat16
    tok.to(dtype="float32")
    assert tok.cpu().dtype == torch.float32
    with pytest.raises(ValueError, match="not supported on cpu"):
        tok.to(dtype=torch.float16)
    assert (tok.device.type, tok.dtype) == ("cpu", torch.float32)  # a refused move changes nothing
    with pytest.raises(ValueError, match="unknown dtype"):
        tok.to(dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available here"):
            tok.to("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (scripts/gpu_check.sh runs this)")
def test_to_on_cuda_keeps_what_it_is_not_given():
    tok = small_tokenizer().to("cuda", dtype=torch.bfloat16)
    tok.to(dtype=torch.float16)
    assert (tok.device.type, tok.dtype) == ("cuda", torch.float16)
    tok.to(dtype=torch.bfloat16).to("cuda")
    assert tok.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not supported on cpu"):
        tok.to(dtype=torch.float16).to("cpu")  # float16 cannot follow to the CPU
    assert tok.to(dtype=torch.float32).cpu().device.type == "cpu"


def photo_paths(tmp_path, count):
    """``count`` small PNGs, cycling over the evaluation photos' first pixels (distinct images)."""
    from pathlib import Path

    photos = sorted((Path(__file__).parent.parent / "evaluation" / "photos").glob("*.png"))
    paths = []
    for index in range(count):
        with Image.open(photos[index % len(photos)]) as photo:
            crop = photo.convert("RGB").crop((index, index, index + 80, index + 80))
        paths.append(tmp_path / f"img{index}.png")
        crop.save(paths[-1])
    return paths


def test_encode_takes_any_iterable_and_a_per_call_batch_size(tmp_path):
    tok = small_tokenizer()
    paths = photo_paths(tmp_path, 9)
    listed = tok.encode(paths, budget=16)
    streamed = tok.encode((p for p in paths), batch_size=3, budget=16)
    assert tok.batch_size == 4  # the object's default is not changed by the call
    assert all(torch.equal(a, b) for a, b in zip(listed.tokens, streamed.tokens)) and len(streamed) == 9
    parts = list(tok.encode_iter(iter(paths), batch_size=4, budget=16))
    assert [len(p) for p in parts] == [4, 4, 1]
    assert torch.equal(EncodeResult.concat(parts).num_tokens, listed.num_tokens)
    batch = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    alone = [tok.encode(image, budget=16).tokens[0] for image in batch]
    for result in (tok.encode(batch, batch_size=2, budget=16), tok.encode([batch[:3], batch[3]], batch_size=2,
                                                                          budget=16)):
        assert all(torch.equal(a, b) for a, b in zip(result.tokens, alone))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            tok.encode(paths, batch_size=bad)
    with pytest.raises(ValueError, match="no images given"):
        tok.encode(iter([]))
    with pytest.raises(TypeError, match="unsupported image input of type int"):
        tok.encode(7)


def test_encode_reads_its_inputs_batch_by_batch(tmp_path):
    """Bounded memory without timing: when the first batch's result is out, the input generator has been read for
    that batch and the one being decoded ahead, not further; a bad argument is refused before any input is read."""
    tok = small_tokenizer()
    paths = photo_paths(tmp_path, 3)
    consumed = []

    def endless():
        while True:
            consumed.append(1)
            yield paths[len(consumed) % 3]

    results = tok.encode_iter(endless(), batch_size=4, budget=16)
    first = next(results)
    assert len(first) == 4 and len(consumed) <= 2 * 4 + 1
    second = next(results)
    assert len(second) == 4 and len(consumed) <= 3 * 4 + 1
    results.close()
    consumed.clear()
    with pytest.raises(ValueError, match="max_tokens/budget must be between"):
        next(tok.encode_iter(endless(), budget=7))
    assert consumed == []
