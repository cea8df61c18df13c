"""The one rule for comparing floating-point results computed two ways.

Two computations of the same quantity differ when they order their sums differently: another batch size or
thread count, another SIMD kernel (``ATEN_CPU_CAPABILITY`` = default / avx2 / avx512 pick different convolution
and matmul kernels), ``torch.compile``, or the authors' code on another machine. Only rounding differs, so the
tolerance follows from the format and the size of the computation, never from what one CPU happened to give:

* a sum or dot product of ``n`` terms in a format with unit roundoff ``u`` (float32: 2^-24) is off by at most
  ``n * u`` relative to its terms' magnitude, and by about ``sqrt(n) * u`` for rounding errors that behave like
  independent random variables (Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM
  J. Sci. Comput. 2019: a bound that holds with overwhelming probability);
* a result ``depth`` weight layers deep (each ``Linear``/``Conv2d`` a reduction of at most ``n`` = its fan-in
  terms; normalisation keeps each layer's gain near 1) accumulates ``depth`` such independent errors, which add in
  quadrature: ``sqrt(n * depth) * u``;
* the two computations each carry that error, and the result has magnitude ``scale``.

Hence ``atol = SAFETY * u * sqrt(n * depth) * scale`` (:func:`atol`; :func:`network_atol` reads ``n`` and
``depth`` off the modules that compute the result). ``SAFETY`` = 16 covers the constant of the probabilistic
bound, layers whose gain exceeds 1 and the two computations' errors. A value stored in a narrower format (the
float16 goldens) adds half an ulp of that format: :func:`storage_atol`.

Measured on a 2-core AVX-512 Xeon under ``ATEN_CPU_CAPABILITY`` = default, avx2 and avx512 with 1 and 2 threads:
the largest differences use at most 9% of these tolerances for decoded pixels (one image alone vs in a batch,
the comparison that failed with a tolerance fitted to one CPU), at most 1.3% for the parity comparisons with the
authors' goldens (whose integer outputs, compared exactly, catch far subtler changes than any float tolerance),
and half for the float16-stored reconstructions, where the storage rounding itself is the bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

SAFETY = 16.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: half the distance from 1 to the next number of ``dtype`` (float32 2^-24, bfloat16 2^-8)."""
    return torch.finfo(dtype).eps / 2


def atol(dtype: torch.dtype, terms: int, depth: int = 1, scale: float = 1.0) -> float:
    """Absolute tolerance for a result of magnitude ``scale``, ``depth`` reductions of ``terms`` terms deep."""
    return SAFETY * unit_roundoff(dtype) * math.sqrt(terms * depth) * scale


def network_atol(modules: Iterable[nn.Module], scale: float | Tensor = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """:func:`atol` of an output computed by ``modules`` (in sequence): ``terms`` is the largest fan-in of their
    ``Linear``/``Conv2d`` layers, ``depth`` their number (attention's weighted sums over the sequence are reductions
    of the same order as those fan-ins in these models, and are left inside the safety factor).
    ``scale``: the result's magnitude, e.g. ``reference.abs().max()``."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise ValueError("network_atol needs modules holding Linear or Conv2d layers")
    fan_in = max(layer.weight[0].numel() for layer in layers)
    return atol(dtype, fan_in, len(layers), float(scale))


def storage_atol(reference: Tensor, stored_as: torch.dtype) -> Tensor:
    """Elementwise: half an ulp of ``stored_as`` at each value of ``reference`` (rounding when it was stored)."""
    return reference.abs() * unit_roundoff(stored_as)


def decode_atol(tok) -> float:
    """Tolerance for decoded pixels (in [0, 1]) of an ``AdaptiveTokenizer``: its latent decoder, then its base
    tokenizer's pixel decoder."""
    return network_atol([tok.model.decoder, tok.model.base.decoder], dtype=tok.dtype)


def error_atol(tok) -> float:
    """Tolerance for a reconstruction error (mean absolute pixel error) of an ``AdaptiveTokenizer``, computed in
    another batch or order: base encoder, every encoder iteration, latent decoder, pixel decoder."""
    model = tok.model
    return network_atol([model.base.encoder] + [model.encoder] * tok.config.max_iterations
                        + [model.decoder, model.base.decoder], dtype=tok.dtype)


def base_error_atol(tok) -> float:
    """Tolerance for the base tokenizer's own reconstruction error (its encoder, then its decoder)."""
    return network_atol([tok.model.base.encoder, tok.model.base.decoder], dtype=tok.dtype)
