"""The rollout engine: iterative encoding, deterministic dynamic halting and per-image length choice.

Iteration ``t`` (0-based) yields ``tokens_per_iteration * (t + 1)`` tokens. How the encoder gets there depends on
the model's ``rollout``:

* ``"recurrent"`` (the authors'): the encoder re-encodes ``[class, 2D tokens, latents 0..t]``, its inputs being
  the previous iteration's outputs plus a new latent block (re-normalised by ``norm_recursive``);
* ``"cached"``: the encoder encodes only the new latent block, attending to the cached keys/values of every
  earlier position (iteration 0 encodes ``[class, 2D tokens, block 0]``).

Between iterations, dynamic halting (when a threshold is given) halts the 2D tokens whose ground-truth base code
the decoder already predicts with probability ``>= halting_threshold``: the recurrent rollout replaces them by
mask tokens, the cached rollout removes them from the keys of all later blocks.

With ``length_threshold`` each image stops at the first iteration whose length score is ``<=`` the threshold; an
image that never meets it gets the iteration with the lowest score (the first one on ties). The score is the
reconstruction's mean absolute pixel error ([0, 1] units) minus ``config.length_floor_weight`` times the base
tokenizer's own error on that image (:func:`~adaptive_tokenizer.model.length_score`; the plain error when the weight
is 0, and the base's reconstruction is then not computed). A score that is not finite (a model whose weights
overflow) raises ValueError rather than leaving the image without tokens. Images that stop leave the batch, so they cost nothing
more. Each image is decided on its own: results do not depend on what else is in the batch.

Work is done only where the request needs it: without halting or a length threshold, neither the decoder nor the
pixel decoder runs, and token vectors are computed only after the last iteration. What does not depend on the
image (latent blocks, decoder queries) is computed once per call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import ALITModel, length_score


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
    halt_mask: Tensor | None  # [n, G2] bool, True = halted from the next iteration on (halting only)
    reconstruction: Tensor  # [n, 3, R, R] float32, unclamped
    error: Tensor  # [n] float32 mean |reconstruction - input|
    length_score: Tensor  # [n] float32 what length_threshold is compared with (see model.length_score)


@dataclass
class RolloutOutput:
    tokens: list[Tensor]  # per image: [L_i] int64 ids, or [L_i, D] float32 vectors
    num_iterations: Tensor  # [N] int64, iterations behind each image's tokens (L_i / tokens_per_iteration)
    errors: Tensor | None  # [N] float32 reconstruction error of the chosen length (length_threshold only)
    length_scores: Tensor | None  # [N] float32 its length score (length_threshold only)


class RecurrentEncoderState:
    """The authors' rollout: the whole sequence is re-encoded at every iteration."""

    def __init__(self, model: ALITModel, prefix: Tensor, num_iterations: int):
        self.encoder = model.encoder
        self.num_prefix = prefix.shape[1]
        block = self.encoder.latent_block(0).expand(prefix.shape[0], -1, -1)
        self.x = self.encoder.norm_pre(torch.cat([prefix, block], dim=1))
        self.halted_tokens = self.encoder.halted_image_tokens()

    def step(self, iteration: int) -> Tensor:
        """Run iteration ``iteration``; return the latents of all tokens so far, ``[n, L, W]``."""
        if iteration > 0:
            block = self.encoder.latent_block(iteration).expand(self.x.shape[0], -1, -1)
            self.x = self.encoder.norm_recursive(torch.cat([self.x, block], dim=1))
        self.x = self.encoder.transformer(self.x)
        return self.x[:, self.num_prefix :]

    def halt(self, mask: Tensor) -> None:
        """Replace the 2D tokens ``mask`` ``[n, G2]`` by mask tokens."""
        image_tokens = self.x[:, 1 : self.num_prefix]
        image_tokens = torch.where(mask[..., None], self.halted_tokens.to(self.x.dtype), image_tokens)
        self.x = torch.cat([self.x[:, :1], image_tokens, self.x[:, self.num_prefix :]], dim=1)

    def select(self, rows: Tensor) -> None:
        self.x = self.x[rows]


class CachedEncoderState:
    """Block-causal rollout: each iteration encodes one latent block against cached keys/values."""

    def __init__(self, model: ALITModel, prefix: Tensor, num_iterations: int):
        self.encoder = encoder = model.encoder
        batch, self.num_prefix = prefix.shape[0], prefix.shape[1]
        self.blocks = encoder.norm_pre(torch.stack([encoder.latent_block(t) for t in range(num_iterations)]))
        self.prefix = encoder.norm_pre(prefix)
        capacity = self.num_prefix + encoder.tokens_per_iteration * num_iterations
        self.cache = encoder.transformer.new_cache(batch, capacity, like=self.prefix)
        self.key_mask = torch.ones(batch, capacity, dtype=torch.bool, device=prefix.device)
        self.latents: Tensor | None = None

    def step(self, iteration: int) -> Tensor:
        block = self.blocks[iteration].expand(self.key_mask.shape[0], -1, -1)
        if iteration == 0:
            out = self.encoder.transformer(torch.cat([self.prefix, block], dim=1), cache=self.cache)
            self.latents = out[:, self.num_prefix :]
            return self.latents
        end = self.cache.length + block.shape[1]
        mask = self.key_mask[:, None, None, :end] if not self.key_mask[:, :end].all() else None
        out = self.encoder.transformer(block, mask, cache=self.cache)
        self.latents = torch.cat([self.latents, out], dim=1)
        return self.latents

    def halt(self, mask: Tensor) -> None:
        """Remove the 2D tokens ``mask`` ``[n, G2]`` from the keys of all later blocks."""
        self.key_mask[:, 1 : self.num_prefix] &= ~mask

    def select(self, rows: Tensor) -> None:
        self.cache.select(rows)
        self.key_mask = self.key_mask[rows]
        self.latents = self.latents[rows]


ENCODER_STATES = {"recurrent": RecurrentEncoderState, "cached": CachedEncoderState}


def rollout(model: ALITModel, pixels: Tensor, num_iterations: int, *, halting_threshold: float | None = None,
            length_threshold: float | None = None, length_floor_weight: float | None = None,
            trace: Callable[[IterationRecord], None] | None = None) -> RolloutOutput:
    """Encode ``pixels`` ``[N, 3, R, R]`` (float in [0, 1], model resolution) into tokens.

    ``num_iterations``: iterations to run at most (1..max_iterations). ``halting_threshold``: dynamic halting
    probability, None for no halting. ``length_threshold``: per-image length choice by length score, whose
    ``length_floor_weight`` is the model's ``config.length_floor_weight`` when None.
    ``trace``: called after every iteration with an :class:`IterationRecord`; tracing decodes and reconstructs
    at every iteration, as the authors' code does (used by the parity tests and the reference benchmark).
    Call under ``torch.inference_mode()``.
    """
    config = model.config
    if not 1 <= num_iterations <= config.max_iterations:
        raise ValueError(f"num_iterations must be in [1, {config.max_iterations}], got {num_iterations}")
    batch = pixels.shape[0]
    pixels = pixels.to(model.encoder.norm_pre.weight.dtype)
    features = model.base.encode(pixels)
    selecting = length_threshold is not None
    floor_weight = config.length_floor_weight if length_floor_weight is None else length_floor_weight
    need_floor = (selecting or trace is not None) and floor_weight > 0
    need_ids = halting_threshold is not None or trace is not None or need_floor
    gt_ids = model.base.code_ids(features) if need_ids else None
    base_error = model.base_error(pixels, gt_ids) if need_floor else torch.zeros(batch, device=pixels.device)
    state = ENCODER_STATES[config.rollout](model, model.encoder.embed_image(pixels, features), num_iterations)
    decoder_queries = model.decoder.normed_queries()

    active = torch.arange(batch, device=pixels.device)
    tokens: list[Tensor | None] = [None] * batch
    chosen = torch.full((batch,), num_iterations, dtype=torch.long)
    best_error = torch.full((batch,), float("inf")) if selecting else None
    best_score = torch.full((batch,), float("inf")) if selecting else None

    for t in range(num_iterations):
        latents = state.step(t)
        last = t == num_iterations - 1
        halting_now = halting_threshold is not None and not last
        need_logits = selecting or halting_now or trace is not None
        if not (last or need_logits):
            continue

        vectors = model.encoder.to_token_vectors(latents).float()
        ids = model.quantizer.quantize(vectors) if model.quantizer is not None else None
        step_tokens = ids if ids is not None else vectors
        logits = gt_prob = halt_mask = recon = error = score = None
        if need_logits:
            logits = model.decoder(model.decoder_inputs(step_tokens), decoder_queries).float()
        if gt_ids is not None and logits is not None:
            gt_prob = torch.softmax(logits, dim=-1).gather(-1, gt_ids[:, :, None])[..., 0]
        if halting_threshold is not None and gt_prob is not None:
            halt_mask = gt_prob >= halting_threshold
            if not last:
                state.halt(halt_mask)
        if selecting or trace is not None:
            recon = model.reconstruct(logits).float()
            error = (recon - pixels.float()).abs().mean(dim=(1, 2, 3))
            score = length_score(error, base_error, floor_weight)
        if trace is not None:
            trace(IterationRecord(t, active.cpu(), latents.float(), vectors, ids, logits, gt_prob, halt_mask,
                                  recon, error, score))

        if not selecting:
            if last:
                for row, image in enumerate(active.tolist()):
                    tokens[image] = step_tokens[row].clone()
            continue
        error_cpu, score_cpu = error.cpu(), score.cpu()
        not_finite = ~torch.isfinite(score_cpu)
        if not_finite.any():  # NaN compares False with everything: no length would ever be chosen
            row = int(not_finite.nonzero()[0])
            raise ValueError(f"the model's reconstruction of image {int(active[row])} of the batch at {t + 1} "
                             f"iterations has a non-finite error ({float(error_cpu[row])}): the model's weights "
                             "overflow, so no length can be chosen")
        for row, image in enumerate(active.tolist()):
            if score_cpu[row] < best_score[image]:
                best_score[image], best_error[image] = score_cpu[row], error_cpu[row]
                tokens[image] = step_tokens[row].clone()
                chosen[image] = t + 1
        keep = score_cpu > length_threshold
        if last or not keep.any():
            break
        if not keep.all():
            rows = keep.nonzero()[:, 0].to(pixels.device)
            active, pixels = active[rows], pixels[rows]
            gt_ids = gt_ids[rows] if gt_ids is not None else None
            base_error = base_error[rows]
            state.select(rows)

    return RolloutOutput(tokens=tokens, num_iterations=chosen,  # type: ignore[arg-type]
                         errors=best_error, length_scores=best_score)
