"""Device-independent behaviour on every device this machine has: CPU always, CUDA when available (run by
``scripts/gpu_check.sh`` on a GPU machine; on a CPU-only machine only the CPU cases exist).

On any device the float32 model gives the CPU's tokens, the same reconstruction within the rounding tolerance of
tests/tolerances.py, and the CPU's halting decisions; bfloat16/float16 give valid tokens and images.
"""

import pytest
import torch

from adaptive_tokenizer import AdaptiveTokenizer
from adaptive_tokenizer.rollout import rollout

from .tolerances import decode_atol

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"cpu": ["float32", "bfloat16"], "cuda": ["float32", "bfloat16", "float16"]}
CASES = [(device, dtype) for device in DEVICES for dtype in DTYPES[device]]


@pytest.fixture(scope="module")
def cpu_reference(converted_dirs, images):
    tok = AdaptiveTokenizer.from_pretrained(converted_dirs["A"])
    fixed = tok.encode(images, budget=64)
    return tok, fixed, tok.decode(fixed), tok.encode(images, halt_threshold=0.5, max_tokens=96)


@pytest.mark.parametrize("device,dtype", CASES)
def test_encode_decode_on_every_device(converted_dirs, images, cpu_reference, device, dtype):
    cpu_tok, fixed, pixels, adaptive = cpu_reference
    tok = AdaptiveTokenizer.from_pretrained(converted_dirs["A"], device=device, dtype=dtype)
    if dtype != "float32":  # one image: CPUs without native bfloat16 (AVX2 only) emulate it, about 50 s per image
        images, fixed, pixels = images[:1], type(fixed)(fixed.tokens[:1], fixed.num_tokens[:1]), pixels[:1]
    result = tok.encode(images.to(device), budget=64)
    assert all(t.device.type == "cpu" and t.dtype == torch.long and len(t) == 64 for t in result.tokens)
    decoded = tok.decode(fixed)
    assert decoded.device.type == device and decoded.dtype == torch.float32 and decoded.shape == pixels.shape
    assert 0 <= decoded.min() and decoded.max() <= 1
    if dtype == "float32":
        assert all(torch.equal(a, b) for a, b in zip(result.tokens, fixed.tokens))
        torch.testing.assert_close(decoded.cpu(), pixels, atol=2 * decode_atol(cpu_tok), rtol=0)
        again = tok.encode(images, halt_threshold=0.5, max_tokens=96)
        assert again.num_tokens.tolist() == adaptive.num_tokens.tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_halting_decisions_on_every_device(converted_dirs, images, device):
    masks = {}
    for where in ("cpu", device):
        tok = AdaptiveTokenizer.from_pretrained(converted_dirs["A"], device=where)
        records = []
        with torch.inference_mode():
            rollout(tok.model, images.to(where), 4, halting_confidence=0.05, trace=records.append)
        masks[where] = [r.halt_mask.cpu() for r in records[:-1]]
    assert all(torch.equal(a, b) for a, b in zip(masks["cpu"], masks[device]))
