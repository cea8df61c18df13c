"""The rollout engine: recurrent encoding, deterministic dynamic halting and per-image length choice.

Iteration ``t`` (0-based) runs the shared encoder over ``[class, 2D tokens, latents of iterations 0..t]`` and
yields ``tokens_per_iteration * (t + 1)`` tokens. Between iterations:

* dynamic halting (when a threshold is given): 2D tokens whose ground-truth base code the decoder already
  predicts with probability ``>= halting_threshold`` are replaced by mask tokens for all later iterations;
* a new block of latent tokens is appended and the whole sequence re-normalised (``norm_recursive``).

With ``length_threshold`` (mean absolute pixel error, [0, 1] units) each image stops at the first iteration
whose reconstruction error is ``<=`` the threshold; an image that never meets it gets the iteration with the
lowest error (first one on ties). Images that stop are dropped from the batch, so they cost nothing more.
Each image is decided on its own: results do not depend on what else is in the batch.

Work is done only where the request needs it: without halting or a length threshold, neither the decoder nor
the pixel decoder runs, and token vectors are computed only after the last iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import ALITModel


@dataclass
class IterationRecord:
    """Everything one iteration computed, for the ``n`` images still active (see ``rollout(trace=...)``)."""

    iteration: int
    image_index: Tensor  # [n] int64 positions in the input batch
    latents: Tensor  # [n, L, W] encoder output for the latent tokens, before norm_post
    token_vectors: Tensor  # [n, L, D] float32, before quantization
    token_ids: Tensor | None  # [n, L] int64 (quantized models)
    logits: Tensor  # [n, G2, K] float32 decoder logits over the base codebook
    gt_prob: Tensor  # [n, G2] decoder probability of each cell's base code
    halt_mask: Tensor | None  # [n, G2] bool, True = masked from the next iteration on (halting only)
    reconstruction: Tensor  # [n, 3, R, R] float32, unclamped
    error: Tensor  # [n] float32 mean |reconstruction - input|


@dataclass
class RolloutOutput:
    tokens: list[Tensor]  # per image: [L_i] int64 ids, or [L_i, D] float32 vectors
    num_iterations: Tensor  # [N] int64, iterations used for each image's tokens (L_i / tokens_per_iteration)
    errors: Tensor | None  # [N] float32 reconstruction error of the chosen length (length_threshold only)


def rollout(model: ALITModel, pixels: Tensor, num_iterations: int, *, halting_threshold: float | None = None,
            length_threshold: float | None = None,
            trace: Callable[[IterationRecord], None] | None = None) -> RolloutOutput:
    """Encode ``pixels`` ``[N, 3, R, R]`` (float in [0, 1], model resolution) into tokens.

    ``num_iterations``: iterations to run at most (1..max_iterations). ``halting_threshold``: dynamic halting
    probability, None for no halting. ``length_threshold``: per-image length choice by reconstruction error.
    ``trace``: called after every iteration with an :class:`IterationRecord`; tracing decodes and reconstructs
    at every iteration, as the authors' code does (used by the parity tests and the reference benchmark).
    """
    config, encoder = model.config, model.encoder
    if not 1 <= num_iterations <= config.max_iterations:
        raise ValueError(f"num_iterations must be in [1, {config.max_iterations}], got {num_iterations}")
    dtype = encoder.norm_pre.weight.dtype
    batch = pixels.shape[0]
    pixels = pixels.to(dtype)
    features = model.base.encode(pixels)
    need_gt = halting_threshold is not None or trace is not None
    gt_ids = model.base.code_ids(features) if need_gt else None
    x = encoder.embed_image(pixels, features)
    num_prefix = x.shape[1]  # class token + 2D tokens
    x = encoder.norm_pre(torch.cat([x, encoder.latent_block(0).expand(batch, -1, -1)], dim=1))
    halted_tokens = encoder.halted_image_tokens() if halting_threshold is not None else None

    active = torch.arange(batch, device=pixels.device)
    tokens: list[Tensor | None] = [None] * batch
    chosen = torch.full((batch,), num_iterations, dtype=torch.long)
    best_error = torch.full((batch,), float("inf")) if length_threshold is not None else None
    selecting = length_threshold is not None

    for t in range(num_iterations):
        x = encoder.transformer(x)
        last = t == num_iterations - 1
        halting_now = halting_threshold is not None and not last
        need_logits = selecting or halting_now or trace is not None
        if not (last or need_logits):
            x = encoder.norm_recursive(torch.cat([x, encoder.latent_block(t + 1).expand(len(active), -1, -1)], 1))
            continue

        latents = x[:, num_prefix:]
        vectors = encoder.to_token_vectors(latents).float()
        ids = model.quantizer.quantize(vectors) if model.quantizer is not None else None
        step_tokens = ids if ids is not None else vectors
        logits = gt_prob = halt_mask = recon = error = None
        if need_logits:
            logits = model.decoder(model.decoder_inputs(step_tokens)).float()
        if gt_ids is not None and logits is not None:
            gt_prob = torch.softmax(logits, dim=-1).gather(-1, gt_ids[:, :, None])[..., 0]
        if halting_threshold is not None and gt_prob is not None:
            halt_mask = gt_prob >= halting_threshold
            if not last:
                image_tokens = torch.where(halt_mask[..., None], halted_tokens.to(x.dtype), x[:, 1:num_prefix])
                x = torch.cat([x[:, :1], image_tokens, x[:, num_prefix:]], dim=1)
        if selecting or trace is not None:
            recon = model.reconstruct(logits).float()
            error = (recon - pixels.float()).abs().mean(dim=(1, 2, 3))
        if trace is not None:
            trace(IterationRecord(t, active.cpu(), latents.float(), vectors, ids, logits, gt_prob, halt_mask,
                                  recon, error))

        if selecting:
            error_cpu = error.cpu()
            for row, image in enumerate(active.tolist()):
                if error_cpu[row] < best_error[image]:
                    best_error[image] = error_cpu[row]
                    tokens[image] = step_tokens[row].clone()
                    chosen[image] = t + 1
            keep = error_cpu > length_threshold
            if last or not keep.any():
                break
            if not keep.all():
                keep_dev = keep.to(x.device)
                active, x, pixels = active[keep_dev], x[keep_dev], pixels[keep_dev]
                gt_ids = gt_ids[keep_dev] if gt_ids is not None else None
        elif last:
            for row, image in enumerate(active.tolist()):
                tokens[image] = step_tokens[row].clone()
            break
        x = encoder.norm_recursive(torch.cat([x, encoder.latent_block(t + 1).expand(len(active), -1, -1)], dim=1))

    return RolloutOutput(tokens=tokens, num_iterations=chosen, errors=best_error)  # type: ignore[arg-type]
