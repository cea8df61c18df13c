"""Shared fixtures: the authors' tiny checkpoints converted once per session, their inputs and goldens."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from adaptive_tokenizer import AdaptiveTokenizer, convert_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
# The tiny fixture models have 4 heads, which no authors' preset implies, so conversion names them.
TINY_HEADS = {"encoder_heads": 4, "decoder_heads": 4}


@pytest.fixture(scope="session", autouse=True)
def attention_kernel_under_a_forced_capability():
    """torch 2.13's CPU flash attention packs bfloat16 operands for AVX-512 VNNI whenever the CPU has the
    instructions, then refuses ("pack_vnni2 is only supported when avx512 is supported") when ATEN_CPU_CAPABILITY
    forces a lower kernel set: a limitation of the override, not of CPUs without AVX-512. Under such an override
    (the CI matrix, tests/tolerances.py) the suite computes attention with the math kernel."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2"):
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    else:
        yield


@pytest.fixture(scope="session")
def converted_dirs(tmp_path_factory) -> dict[str, Path]:
    """Variant A (quantized) and B (continuous), converted with dynamic halting off."""
    out = {}
    for variant in "AB":
        directory = tmp_path_factory.mktemp(f"alit_tiny_{variant}")
        convert_checkpoint(FIXTURES / f"alit_tiny_{variant}.pth", directory, dynamic_halting=False, **TINY_HEADS)
        out[variant] = directory
    return out


@pytest.fixture(scope="session")
def tok_a(converted_dirs) -> AdaptiveTokenizer:
    return AdaptiveTokenizer.from_pretrained(converted_dirs["A"])


@pytest.fixture(scope="session")
def tok_b(converted_dirs) -> AdaptiveTokenizer:
    return AdaptiveTokenizer.from_pretrained(converted_dirs["B"])


@pytest.fixture(scope="session")
def images_u8() -> torch.Tensor:
    """uint8 [3, 3, 256, 256]: the three reference images, already resized and cropped."""
    return load_file(FIXTURES / "inputs.safetensors")["imgs_u8"]


@pytest.fixture(scope="session")
def images(images_u8) -> torch.Tensor:
    """The reference float input: true division by 255 (bit-identical to torchvision ToTensor)."""
    return images_u8.to(torch.float32) / 255
