"""The rollout engine: iterative encoding, deterministic dynamic halting and per-image length choice.

Iteration ``t`` (0-based) yields ``tokens_per_iteration * (t + 1)`` tokens. How the encoder gets there depends on
the model's ``rollout``:

* ``"recurrent"`` (the authors'): the encoder re-encodes ``[class, 2D tokens, latents 0..t]``, its inputs being
  the previous iteration's outputs plus a new latent block (re-normalised by ``norm_recursive``);
* ``"cached"``: the encoder encodes only the new latent block, attending to the cached keys/values of every
  earlier position (iteration 0 encodes ``[class, 2D tokens, block 0]``).

Between iterations, dynamic halting (when a threshold is given) halts the 2D tokens whose ground-truth base code
the decoder already predicts with probability ``>= halting_confidence``: the recurrent rollout replaces them by
mask tokens, the cached rollout removes them from the keys of all later blocks.

With ``target_error`` (the exact length rule) each image stops at the first iteration whose reconstruction's
mean absolute pixel error ([0, 1] units) is ``<=`` the threshold; an image that never meets it gets the iteration
with the lowest error (the first one on ties). Images that stop leave the batch, so they cost nothing more. Each
image is decided on its own: results do not depend on what else is in the batch. The cheaper rules (a
predict-then-verify search, the learned length predictor) are in ``length_rules.py`` and share
:class:`RolloutRun`.

Work is done only where the request needs it: without halting or a length threshold, neither the decoder nor the
pixel decoder runs, and token vectors are computed only after the last iteration. What does not depend on the
image (latent blocks, decoder queries) is computed once per call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError
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
    halt_mask: Tensor | None  # [n, G2] bool, True = halted from the next iteration on (halting only)
    reconstruction: Tensor  # [n, 3, R, R] float32, unclamped
    error: Tensor  # [n] float32 mean |reconstruction - input|


@dataclass
class RolloutOutput:
    tokens: list[Tensor]  # per image: [L_i] int64 ids, or [L_i, D] float32 vectors
    num_iterations: Tensor  # [N] int64, iterations behind each image's tokens (L_i / tokens_per_iteration)
    errors: Tensor | None  # [N] float32 measured reconstruction error of the chosen length (measured rules only)
    predicted_errors: Tensor | None = None  # [N] float32 the length predictor's estimate (predictor rules only)
    decodes: Tensor | None = None  # [N] int64 lengths decoded to pixels to choose each length (length rules only)


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
        if iteration == 0:
            self.prefix_out = self.x[:, : self.num_prefix]
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
        self.halted = False  # whether any key was removed: known on the host, so no device sync asks it
        self.latents: Tensor | None = None

    def step(self, iteration: int) -> Tensor:
        block = self.blocks[iteration].expand(self.key_mask.shape[0], -1, -1)
        if iteration == 0:
            out = self.encoder.transformer(torch.cat([self.prefix, block], dim=1), cache=self.cache)
            self.prefix_out = out[:, : self.num_prefix]
            self.latents = out[:, self.num_prefix :]
            return self.latents
        end = self.cache.length + block.shape[1]
        mask = self.key_mask[:, None, None, :end] if self.halted else None
        out = self.encoder.transformer(block, mask, cache=self.cache)
        self.latents = torch.cat([self.latents, out], dim=1)
        return self.latents

    def halt(self, mask: Tensor) -> None:
        """Remove the 2D tokens ``mask`` ``[n, G2]`` from the keys of all later blocks."""
        self.key_mask[:, 1 : self.num_prefix] &= ~mask
        self.halted = True

    def select(self, rows: Tensor) -> None:
        self.cache.select(rows)
        self.key_mask = self.key_mask[rows]
        self.latents = self.latents[rows]


ENCODER_STATES = {"recurrent": RecurrentEncoderState, "cached": CachedEncoderState}


class RolloutRun:
    """One batch's rollout in progress: the per-image work done once (base encoding, 2D tokens, base codes), the
    encoder state, and the images still active. Shared by :func:`rollout` and the length rules
    (``length_rules.py``)."""

    def __init__(self, model: ALITModel, pixels: Tensor, num_iterations: int, *,
                 halting_confidence: float | None = None, need_code_ids: bool = False):
        config = model.config
        if not 1 <= num_iterations <= config.max_iterations:
            raise InputError(f"num_iterations must be in [1, {config.max_iterations}], got {num_iterations}")
        self.model, self.num_iterations, self.halting_confidence = model, num_iterations, halting_confidence
        self.pixels = pixels.to(model.encoder.norm_pre.weight.dtype)
        self.base_features = model.base.encode(self.pixels)
        need_code_ids = need_code_ids or halting_confidence is not None
        self.code_ids = model.base.code_ids(self.base_features) if need_code_ids else None
        prefix = model.encoder.embed_image(self.pixels, self.base_features)
        self.state = ENCODER_STATES[config.rollout](model, prefix, num_iterations)
        self.decoder_queries = model.decoder.normed_queries()
        self.active = torch.arange(pixels.shape[0], device=pixels.device)  # input rows still running
        self.active_rows = list(range(pixels.shape[0]))  # the same, on the host (no device sync to read it)
        self.iteration = 0  # the next iteration to run
        # cached rollout: an earlier block's latents never change, so neither do its tokens (see all_tokens)
        self.earlier_tokens: tuple[Tensor, Tensor | None] | None = None

    def encode_step(self) -> Tensor:
        """Run the next iteration's encoder; return the latents of all tokens so far ``[n, L, W]``."""
        latents = self.state.step(self.iteration)
        self.iteration += 1
        return latents

    def tokens(self, latents: Tensor) -> tuple[Tensor, Tensor | None]:
        """Latents -> (token vectors ``[n, L, D]`` float32, ids ``[n, L]`` or None for continuous models)."""
        vectors = self.model.encoder.to_token_vectors(latents).float()
        ids = self.model.quantizer.quantize(vectors) if self.model.quantizer is not None else None
        return vectors, ids

    def all_tokens(self, latents: Tensor) -> tuple[Tensor, Tensor | None]:
        """:meth:`tokens` of every active image's latents so far ``[n, L, W]`` (what :meth:`encode_step` returned).
        With the cached rollout only the blocks not seen by an earlier call are computed: the earlier blocks'
        latents, hence their tokens, never change (the same numbers: each token is computed on its own)."""
        if self.model.config.rollout != "cached":
            return self.tokens(latents)
        done = 0 if self.earlier_tokens is None else self.earlier_tokens[0].shape[1]
        vectors, ids = self.tokens(latents[:, done:])
        if self.earlier_tokens is not None:
            earlier_vectors, earlier_ids = self.earlier_tokens
            vectors = torch.cat([earlier_vectors, vectors], dim=1)
            ids = torch.cat([earlier_ids, ids], dim=1) if ids is not None else None
        self.earlier_tokens = vectors, ids
        return vectors, ids

    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens (ids or vectors) of the active images -> decoder logits ``[n, G2, K]`` float32."""
        return self.model.decoder(self.model.decoder_inputs(tokens), self.decoder_queries).float()

    def code_prob(self, logits: Tensor) -> Tensor | None:
        """The decoder's probability of each cell's base code ``[n, G2]`` (None without base codes)."""
        if self.code_ids is None:
            return None
        return torch.softmax(logits, dim=-1).gather(-1, self.code_ids[:, :, None])[..., 0]

    def halt(self, code_prob: Tensor) -> Tensor:
        """Dynamic halting after the iteration just run: halt cells with ``code_prob >= halting_confidence``."""
        mask = code_prob >= self.halting_confidence
        if self.iteration < self.num_iterations:
            self.state.halt(mask)
        return mask

    def error(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(unclamped reconstruction ``[n, 3, R, R]`` float32, its mean absolute error ``[n]`` float32)."""
        reconstruction = reconstruct(self.model, logits)
        return reconstruction, pixel_error(reconstruction, self.pixels.float())

    def keep(self, rows: Tensor) -> None:
        """Keep only the active images at positions ``rows`` (the others leave the batch)."""
        self.active_rows = [self.active_rows[r] for r in rows.tolist()]
        rows = rows.to(self.pixels.device)
        self.active, self.pixels = self.active[rows], self.pixels[rows]
        self.base_features = self.base_features[rows]
        self.code_ids = self.code_ids[rows] if self.code_ids is not None else None
        if self.earlier_tokens is not None:
            vectors, ids = self.earlier_tokens
            self.earlier_tokens = vectors[rows], ids[rows] if ids is not None else None
        self.state.select(rows)


def pixel_error(reconstruction: Tensor, pixels: Tensor) -> Tensor:
    """Mean absolute pixel error per image, ``[n]``: the quantity ``halt_threshold`` is a target for."""
    return (reconstruction - pixels).abs().mean(dim=(1, 2, 3))


# Images per pixel-decoder call, by device type: on a CPU a few at a time run faster than one big batch (their
# activations stay in cache: measured on the project's machines); on an accelerator the whole batch at once (more
# parallel work, fewer launches). A device type not listed decodes the whole batch.
PIXEL_DECODE_CHUNKS = {"cpu": 4}


def reconstruct(model: ALITModel, logits: Tensor) -> Tensor:
    """Decoder ``logits`` ``[n, G2, K]`` -> unclamped reconstructions ``[n, 3, R, R]`` float32, decoded
    :data:`PIXEL_DECODE_CHUNKS` images at a time for the logits' device type."""
    chunk = PIXEL_DECODE_CHUNKS.get(logits.device.type) or max(len(logits), 1)
    return torch.cat([model.reconstruct(part).float() for part in logits.split(chunk)])


def pixel_errors(model: ALITModel, logits: Tensor, pixels: Tensor) -> Tensor:
    """:func:`pixel_error` of the reconstructions from decoder ``logits`` against ``pixels`` ``[n, 3, R, R]``."""
    return pixel_error(reconstruct(model, logits), pixels.float())


def rollout(model: ALITModel, pixels: Tensor, num_iterations: int, *, halting_confidence: float | None = None,
            target_error: float | None = None,
            trace: Callable[[IterationRecord], None] | None = None) -> RolloutOutput:
    """Encode ``pixels`` ``[N, 3, R, R]`` (float in [0, 1], model resolution) into tokens.

    ``num_iterations``: iterations to run at most (1..max_iterations). ``halting_confidence``: dynamic halting
    probability, None for no halting. ``target_error``: the exact length rule (each image stops at the first
    iteration whose reconstruction error is ``<=`` it, decoding every iteration up to there).
    ``trace``: called after every iteration with an :class:`IterationRecord`; tracing decodes and reconstructs
    at every iteration, as the authors' code does (used by the parity tests and the reference benchmark).
    Call under ``torch.inference_mode()``.
    """
    batch = pixels.shape[0]
    run = RolloutRun(model, pixels, num_iterations, halting_confidence=halting_confidence,
                     need_code_ids=trace is not None)
    selecting = target_error is not None
    tokens: list[Tensor | None] = [None] * batch
    chosen = torch.full((batch,), num_iterations, dtype=torch.long)
    best_error = torch.full((batch,), float("inf")) if selecting else None
    decodes = torch.zeros(batch, dtype=torch.long) if selecting else None

    for t in range(num_iterations):
        latents = run.encode_step()
        last = t == num_iterations - 1
        halting_now = halting_confidence is not None and not last
        need_logits = selecting or halting_now or trace is not None
        if not (last or need_logits):
            continue

        vectors, ids = run.all_tokens(latents)
        step_tokens = ids if ids is not None else vectors
        logits = code_prob = halt_mask = recon = error = None
        if need_logits:
            logits = run.decode(step_tokens)
            code_prob = run.code_prob(logits)
        if halting_confidence is not None and code_prob is not None:
            halt_mask = run.halt(code_prob)
        if selecting or trace is not None:
            recon, error = run.error(logits)
        if trace is not None:
            trace(IterationRecord(t, run.active.cpu(), latents.float(), vectors, ids, logits, code_prob, halt_mask,
                                  recon, error))

        if not selecting:
            if last:
                for row, image in enumerate(run.active_rows):
                    tokens[image] = step_tokens[row].clone()
            continue
        error_cpu = check_finite(error.cpu())  # the iteration's one device sync: the host decides who goes on
        decodes[run.active_rows] += 1
        for row, image in enumerate(run.active_rows):
            if error_cpu[row] < best_error[image]:
                best_error[image] = error_cpu[row]
                tokens[image] = step_tokens[row].clone()
                chosen[image] = t + 1
        keep = error_cpu > target_error
        if last or not keep.any():
            break
        if not keep.all():
            run.keep(keep.nonzero()[:, 0])

    return RolloutOutput(tokens=tokens, num_iterations=chosen, errors=best_error,  # type: ignore[arg-type]
                         decodes=decodes)


def check_finite(error: Tensor) -> Tensor:
    """``error`` itself; ValueError when the model produced a non-finite reconstruction (broken weights)."""
    if not torch.isfinite(error).all():
        raise InputError("the model produced a non-finite (NaN or infinite) reconstruction error, so no length "
                         "can be chosen by halt_threshold; its weights are broken (check the model files)")
    return error
