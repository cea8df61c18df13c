"""How ``encode(halt_threshold=E)`` chooses each image's length: four rules with one target.

The target is the same for every rule: the fewest tokens whose reconstruction's mean absolute pixel error
(pixels in [0, 1], unclamped, as :func:`~adaptive_tokenizer.rollout.pixel_error`) is ``<= E``; an image that
no length up to the budget brings to ``E`` gets the length with the lowest error. The rules differ in how they
find it:

* ``"exact"``: decode every length from the shortest up until one meets ``E`` (the authors' algorithm, per
  image; :func:`~adaptive_tokenizer.rollout.rollout` with ``target_error``). Always the fewest tokens.
* ``"search"``: run the encoder, then decode only where the answer can be: start at the length the model's length
  predictor expects (bisection when it has none) and step until a length meets ``E`` while the next shorter one
  does not; when not even the longest length meets ``E``, walk down from it to the lowest error
  (:class:`LengthSearch`). The encoder runs one iteration at a time, and an image leaves its batch once its answer
  is known to be no longer. It returns the exact rule's length whenever the lengths meeting ``E`` form one
  unbroken run and an unreachable image's error does not fall again after rising twice (seen from the longest
  length down): every photo measured so far. Fewer decodes where images reach ``E``; as many where they do not.
* ``"verified"``: start at the length the predictor expects (:data:`VERIFIED_START_MARGIN`), decode it, and step up
  one length at a time only while the error is above ``E`` (never down; when no length from the start on meets
  ``E``, the lowest error seen). A length meeting ``E`` whenever one from the start on does, at about one decode per
  image; not always the fewest tokens (a start past the answer is kept). Needs a length predictor
  (:class:`VerifiedStep`, run by the search's machinery).
* ``"predicted"``: the length predictor (``length_predictor.py``) estimates every length's error from what the
  encoder computed at its first iteration; each image takes the first length whose estimate, times ``1 + margin``
  (the predictor's safety margin against under-estimates), meets ``E``, and runs exactly the iterations that
  length needs, with no decoder and no pixel decode, as a fixed budget does. Its error is predicted, not measured.

Every rule decides each image on its own: its length never depends on the rest of the batch, and a chosen length
``k`` gives exactly the tokens of ``encode(budget=k)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from .errors import InputError
from .length_predictor import feature_vector
from .model import ALITModel
from .rollout import RolloutOutput, RolloutRun, check_finite, pixel_errors, rollout

LengthRule = Literal["exact", "search", "verified", "predicted"]
LENGTH_RULES: tuple[str, ...] = ("exact", "search", "verified", "predicted")
PREDICTOR_RULES: tuple[str, ...] = ("verified", "predicted")  # the rules that need a model with a length predictor
# The rule `encode(halt_threshold=E)` uses when none is given; models without a length predictor use
# FALLBACK_LENGTH_RULE instead (docs/adaptive_length.md says why this one).
DEFAULT_LENGTH_RULE = "verified"
FALLBACK_LENGTH_RULE = "exact"
# Where the search starts: the first length whose estimate x (1 + SEARCH_START_MARGIN) meets the target. Starting
# one length short costs the same two decodes as starting right (the failure below is then known), one length long
# costs three, so the start leans short, unlike the predicted rule's margin. Chosen on the default model's 83
# held-out corpus photos by the lowest modelled decoding cost (docs/adaptive_length.md); the lengths do not depend
# on it.
SEARCH_START_MARGIN = -0.03
# Where the verified rule starts: the first length whose estimate x (1 + VERIFIED_START_MARGIN) meets the target.
# A start short of the answer costs one decode per length stepped up; a start past it costs tokens. Chosen on the
# default model's 83 held-out corpus photos by a criterion written before any result (docs/adaptive_length.md).
VERIFIED_START_MARGIN = 0.0


def resolve_length_rule(model: ALITModel, halt_threshold: float | None, length_rule: str | None) -> str | None:
    """The rule that ``encode`` runs: None for a fixed budget (no ``halt_threshold``), else ``length_rule``, or the
    default (:data:`DEFAULT_LENGTH_RULE`; :data:`FALLBACK_LENGTH_RULE` for a model without a length predictor).
    ValueError for an unknown rule, a rule without a target, or a rule that needs a predictor the model lacks."""
    if length_rule is None:
        if halt_threshold is None:
            return None
        needs_predictor = DEFAULT_LENGTH_RULE in PREDICTOR_RULES
        return FALLBACK_LENGTH_RULE if needs_predictor and model.length_predictor is None else DEFAULT_LENGTH_RULE
    if length_rule not in LENGTH_RULES:
        raise InputError(f"length_rule must be one of {list(LENGTH_RULES)}, got {length_rule!r}")
    if halt_threshold is None:
        raise InputError(f"length_rule={length_rule!r} chooses lengths for a target error: give halt_threshold "
                         "too (without it every image gets max_tokens tokens)")
    if length_rule in PREDICTOR_RULES:
        require_predictor(model, f"length_rule={length_rule!r}")
    return length_rule


def choose_iterations(errors: Tensor, thresholds: Sequence[float] | Tensor) -> Tensor:
    """The length rule on a table: errors ``[N, I]``, thresholds ``[T]`` -> chosen iteration index ``[T, N]``
    (0-based): the first with error ``<=`` its target, else the lowest-error one (first on ties).

    The comparison is made in the errors' dtype (float32, as the rollout's), as the rollout compares its float32
    errors with a Python float target: ``0.3 <= 0.3`` holds even though float32(0.3) > 0.3 in float64.
    """
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1).to(errors.dtype)
    meets = errors[None] <= thresholds[:, None, None]  # [T, N, I]
    first = meets.to(torch.uint8).argmax(dim=2)  # first True (argmax returns the first maximum)
    fallback = first_argmin(errors)[None].expand_as(first)
    return torch.where(meets.any(dim=2), first, fallback)


def verified_iterations(errors: Tensor, starts: Tensor, thresholds: Sequence[float] | Tensor) -> tuple[Tensor, Tensor]:
    """The verified rule on a table (what :class:`VerifiedStep` does per image): errors ``[N, I]``, starts ``[T, N]``
    and thresholds ``[T]`` -> (chosen iteration index ``[T, N]``, decodes ``[T, N]``): the first length from the
    start on with error ``<=`` its target, else the lowest-error one from the start on (first on ties)."""
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1).to(errors.dtype)
    iterations = errors.shape[1]
    seen = torch.arange(iterations)[None, None, :] >= starts[:, :, None]  # [T, N, I]
    meets = (errors[None] <= thresholds[:, None, None]) & seen
    first = meets.to(torch.uint8).argmax(dim=2)
    unseen_last = errors[None].masked_fill(~seen, float("inf"))
    low = unseen_last.min(dim=2, keepdim=True).values
    fallback = (unseen_last == low).to(torch.uint8).argmax(dim=2)
    reached = meets.any(dim=2)
    chosen = torch.where(reached, first, fallback)
    decodes = torch.where(reached, first - starts + 1, iterations - starts)
    return chosen, decodes


def first_argmin(errors: Tensor) -> Tensor:
    """Index of the lowest value of each row ``[N, I]`` -> ``[N]``, the first one on ties."""
    low = errors.min(dim=1, keepdim=True).values
    return (errors == low).to(torch.uint8).argmax(dim=1)


def choose_length(model: ALITModel, pixels: Tensor, num_iterations: int, target_error: float, rule: str, *,
                  halting_confidence: float | None = None) -> RolloutOutput:
    """Tokens of ``pixels`` ``[N, 3, R, R]`` with each image's length chosen by ``rule`` for ``target_error``
    (see the module docstring). Call under ``torch.inference_mode()``."""
    if rule == "exact":
        return rollout(model, pixels, num_iterations, halting_confidence=halting_confidence,
                       target_error=target_error)
    if rule == "predicted":
        return predicted_rollout(model, pixels, num_iterations, target_error, halting_confidence=halting_confidence)
    if rule == "verified":
        return verified_rollout(model, pixels, num_iterations, target_error, halting_confidence=halting_confidence)
    if rule == "search":
        return search_rollout(model, pixels, num_iterations, target_error, halting_confidence=halting_confidence)
    raise InputError(f"length_rule must be one of {list(LENGTH_RULES)}, got {rule!r}")


def first_iteration_features(model: ALITModel, run: RolloutRun, latents: Tensor,
                             groups: tuple[str, ...] | None = None) -> Tensor:
    """The length predictor's raw input ``[n, F]`` once ``run`` has run its first iteration (``latents``: its
    output). ``groups``: default the model's predictor's."""
    groups = groups if groups is not None else model.length_predictor.groups
    return feature_vector(groups, run.state.prefix_out, latents, run.base_features, run.pixels, model.base.codebook)


def _predicted_errors(model: ALITModel, run: RolloutRun, latents: Tensor, num_iterations: int) -> Tensor:
    """The length predictor's error estimates ``[n, num_iterations]`` after the first iteration."""
    predicted = model.length_predictor(first_iteration_features(model, run, latents))[:, :num_iterations]
    if not torch.isfinite(predicted).all():
        raise InputError("the length predictor produced non-finite (NaN or infinite) error estimates; its weights or "
                         "the model's are broken (check the model files, or refit it with fit-length-predictor)")
    return predicted


def predicted_choice(predicted: Tensor, target_error: float, margin: float) -> Tensor:
    """The predicted rule's iteration indices ``[N]``: the exact rule on the estimates ``[N, I]`` times
    ``1 + margin`` (the predictor's safety margin)."""
    return choose_iterations(predicted * (1 + margin), [target_error])[0]


def predict_errors(model: ALITModel, pixels: Tensor) -> Tensor:
    """The length predictor's estimate of every length's error ``[N, max_iterations]`` (one encoder iteration)."""
    require_predictor(model, "predict_errors")
    run = RolloutRun(model, pixels, 1)
    return _predicted_errors(model, run, run.encode_step(), model.config.max_iterations).float()


def predicted_rollout(model: ALITModel, pixels: Tensor, num_iterations: int, target_error: float, *,
                      halting_confidence: float | None = None) -> RolloutOutput:
    """The ``"predicted"`` rule: lengths from the predictor, then exactly those iterations, no pixel decode."""
    require_predictor(model, "length_rule='predicted'")
    batch = pixels.shape[0]
    run = RolloutRun(model, pixels, num_iterations, halting_confidence=halting_confidence)
    latents = run.encode_step()
    predicted = _predicted_errors(model, run, latents, num_iterations).float().cpu()
    stop = predicted_choice(predicted, target_error, model.length_predictor.margin)  # [N] 0-based, per image
    tokens: list[Tensor | None] = [None] * batch
    for t in range(num_iterations):
        if t > 0:
            latents = run.encode_step()
        finishing = stop[run.active_rows] == t
        finishing_rows = finishing.nonzero()[:, 0]
        if halting_confidence is not None and not bool(finishing.all()):  # the others go on: halt them
            vectors, ids = run.all_tokens(latents)
            step_tokens = ids if ids is not None else vectors
            run.halt(run.code_prob(run.decode(step_tokens)))
            step_tokens = step_tokens[finishing_rows.to(latents.device)]
        else:
            vectors, ids = run.tokens(latents[finishing_rows.to(latents.device)])
            step_tokens = ids if ids is not None else vectors
        for position, row in enumerate(finishing_rows.tolist()):
            tokens[run.active_rows[row]] = step_tokens[position].clone()
        if bool(finishing.all()):
            break
        run.keep((~finishing).nonzero()[:, 0])
    chosen = stop + 1
    return RolloutOutput(tokens=tokens, num_iterations=chosen, errors=None,  # type: ignore[arg-type]
                         predicted_errors=predicted.gather(1, stop[:, None])[:, 0],
                         decodes=torch.zeros(batch, dtype=torch.long))


class LengthSearch:
    """Per-image bookkeeping of the ``"search"`` rule: which lengths were decoded and what they gave.

    With a length predictor the search starts at the predicted length and walks down while the shorter length
    still meets the target (or up, one length, then to the longest); without one it bisects. A failing length
    right below a passing one ends it: that is the exact rule's first crossing whenever the lengths meeting the
    target form one unbroken run. When not even the longest length meets the target, the answer is the
    lowest-error length: the search walks down from the longest and stops after the error has risen
    ``patience`` times in a row (or at the shortest length), which finds the lowest error whenever the error,
    seen from the longest length down, does not fall again after such a rise. Both conditions held for every
    photo measured (``docs/adaptive_length.md``).
    """

    patience = 2

    def __init__(self, start: int, num_iterations: int, target_error: float, bisect: bool):
        # compared in float32, as the exact rule compares its float32 errors with the target
        target_error = float(torch.tensor(target_error, dtype=torch.float32))
        self.num_iterations, self.target_error, self.bisect = num_iterations, target_error, bisect
        self.errors: dict[int, float] = {}
        self.start = start

    def next_probes(self) -> list[int]:
        """The iteration indices to decode next (empty when the length is decided)."""
        if not self.errors:
            return [self.start]
        first_pass = self.first_pass()
        if first_pass is not None:
            return self._first_pass_probes(first_pass)
        top, last = max(self.errors), self.num_iterations - 1
        if top < last:  # no length meets the target yet: look at longer ones
            if self.bisect:
                return [(top + self.num_iterations) // 2]
            return [top + 1] if top == self.start else [last]
        return self._lowest_error_probes()

    def _first_pass_probes(self, k: int) -> list[int]:
        """``k`` meets the target: decided when ``k - 1`` is known to fail, else look below it."""
        below = max([t for t in self.errors if t < k], default=-1)  # a known failure (or none)
        if k - below == 1:
            return []
        if self.bisect or below >= 0:  # a bracket: bisect it
            return [(below + k) // 2]
        return [k - 1]  # walk down from the predictor's length

    def _lowest_error_probes(self) -> list[int]:
        """No length meets the target: walk down from the longest until the error has risen ``patience`` times in a
        row. The lengths it must see before it can stop are decoded together (no more than one at a time would)."""
        lowest = self.num_iterations - 1
        while lowest - 1 in self.errors:
            lowest -= 1
        best, rises = float("inf"), 0
        for t in range(self.num_iterations - 1, lowest - 1, -1):
            if self.errors[t] <= best:
                best, rises = self.errors[t], 0
            else:
                rises += 1
        if lowest == 0 or rises >= self.patience:
            return []
        below = range(lowest - 1, max(lowest - 1 - (self.patience - rises), -1), -1)
        return [t for t in below if t not in self.errors]

    def first_pass(self) -> int | None:
        """The shortest decoded length (iteration index) meeting the target, None while there is none."""
        return min((t for t, e in self.errors.items() if e <= self.target_error), default=None)

    def longest_needed(self) -> int:
        """The longest iteration index this search may still decode: below its shortest passing length once one
        is known (the answer cannot be longer), else the longest."""
        first_pass = self.first_pass()
        return first_pass if first_pass is not None else self.num_iterations - 1

    def chosen(self) -> int:
        """The decided iteration index: the first length meeting the target, else the (first) lowest-error one."""
        first_pass = self.first_pass()
        if first_pass is not None:
            return first_pass
        return min(self.errors, key=lambda t: (self.errors[t], t))


class VerifiedStep(LengthSearch):
    """Per-image bookkeeping of the ``"verified"`` rule: decode the start, then one length longer at a time while
    the error is above the target; the first length meeting it, else the lowest error seen (first on ties)."""

    def __init__(self, start: int, num_iterations: int, target_error: float):
        super().__init__(start, num_iterations, target_error, bisect=False)

    def next_probes(self) -> list[int]:
        if not self.errors:
            return [self.start]
        top = max(self.errors)
        if self.first_pass() is not None or top == self.num_iterations - 1:
            return []
        return [top + 1]


def search_starts(predicted: Tensor | None, target_error: float, batch: int, num_iterations: int) -> list[int]:
    """Where the search starts for each image: the predicted length leaning short (``SEARCH_START_MARGIN``) given
    the predictor's estimates ``[N, I]``, the longest length when no estimate meets the target (the answer is then
    most likely the lowest error, found walking down from the longest), else the middle length (bisection)."""
    if predicted is None:
        return [(num_iterations - 1) // 2] * batch
    starts = predicted_choice(predicted, target_error, SEARCH_START_MARGIN)
    leaning_short = predicted * (1 + SEARCH_START_MARGIN)
    reachable = (leaning_short <= torch.tensor(target_error, dtype=predicted.dtype)).any(dim=1)
    return torch.where(reachable, starts, torch.full_like(starts, num_iterations - 1)).tolist()


def search_rollout(model: ALITModel, pixels: Tensor, num_iterations: int, target_error: float, *,
                   halting_confidence: float | None = None) -> RolloutOutput:
    """The ``"search"`` rule: decode only the lengths needed to find where the error crosses the target, starting
    from the predictor's length (bisection without a predictor)."""
    def searches(predicted: Tensor | None) -> list[LengthSearch]:
        starts = search_starts(predicted, target_error, pixels.shape[0], num_iterations)
        return [LengthSearch(s, num_iterations, target_error, bisect=predicted is None) for s in starts]

    return decoding_rollout(model, pixels, num_iterations, searches, halting_confidence=halting_confidence,
                            need_predictor=False)


def verified_rollout(model: ALITModel, pixels: Tensor, num_iterations: int, target_error: float, *,
                     halting_confidence: float | None = None) -> RolloutOutput:
    """The ``"verified"`` rule: decode the predicted length, step up while the error is above the target."""
    def steps(predicted: Tensor | None) -> list[LengthSearch]:
        starts = predicted_choice(predicted, target_error, VERIFIED_START_MARGIN).tolist()
        return [VerifiedStep(s, num_iterations, target_error) for s in starts]

    return decoding_rollout(model, pixels, num_iterations, steps, halting_confidence=halting_confidence,
                            need_predictor=True)


def decoding_rollout(model: ALITModel, pixels: Tensor, num_iterations: int,
                     make_searches: Callable[[Tensor | None], list[LengthSearch]], *,
                     halting_confidence: float | None, need_predictor: bool) -> RolloutOutput:
    """Run the per-image searches that ``make_searches(estimates [N, I] or None)`` returns: the encoder one
    iteration at a time; whatever lengths the searches ask for that are already encoded are decoded together
    (:func:`probe_errors`), and an image leaves the encoder's batch once no longer length can be its answer, so
    images that settle early cost no more encoding."""
    if need_predictor:
        require_predictor(model, "length_rule='verified'")
    run = RolloutRun(model, pixels, num_iterations, halting_confidence=halting_confidence)
    all_pixels = run.pixels
    latents = run.encode_step()
    predicted = (_predicted_errors(model, run, latents, num_iterations).float().cpu()
                 if model.length_predictor is not None else None)
    searches = make_searches(predicted)
    step_tokens: list[Tensor] = []  # per iteration t: tokens [n_t, L_t] of the images encoded that far
    step_rows: list[dict[int, int]] = []  # per iteration t: image -> its row in step_tokens[t]

    def keep_tokens() -> None:
        vectors, ids = run.all_tokens(latents)
        step_tokens.append(ids if ids is not None else vectors)
        step_rows.append({image: row for row, image in enumerate(run.active_rows)})
        if halting_confidence is not None and run.iteration < num_iterations:
            run.halt(run.code_prob(run.decode(step_tokens[-1])))

    keep_tokens()
    while True:
        probes = {image: search.next_probes() for image, search in enumerate(searches)}
        ready = [(image, t) for image, ts in probes.items() if ts and max(ts) < len(step_tokens) for t in ts]
        if ready:
            for (image, t), value in zip(ready, probe_errors(model, run, ready, step_tokens, step_rows, all_pixels)):
                searches[image].errors[t] = value
            continue
        if not any(probes.values()):
            break
        # nothing to decode yet: encode the next length, for the images that may still need it
        encoded = len(step_tokens)
        needed = [row for row, image in enumerate(run.active_rows) if searches[image].longest_needed() >= encoded]
        if len(needed) < len(run.active_rows):
            run.keep(torch.tensor(needed, dtype=torch.long))
        latents = run.encode_step()
        keep_tokens()
    chosen = [s.chosen() for s in searches]
    tokens = [step_tokens[t][step_rows[t][image]].clone() for image, t in enumerate(chosen)]
    errors = torch.tensor([s.errors[t] for s, t in zip(searches, chosen)], dtype=torch.float32)
    estimates = predicted.gather(1, torch.tensor(chosen)[:, None])[:, 0] if predicted is not None else None
    return RolloutOutput(tokens=tokens, num_iterations=torch.tensor(chosen, dtype=torch.long) + 1, errors=errors,
                         predicted_errors=estimates if need_predictor else None,
                         decodes=torch.tensor([len(s.errors) for s in searches], dtype=torch.long))


def probe_errors(model: ALITModel, run: RolloutRun, probes: list[tuple[int, int]], step_tokens: list[Tensor],
                 step_rows: list[dict[int, int]], pixels: Tensor) -> list[float]:
    """The reconstruction errors of ``probes`` ``(image, iteration)``: the decoder per length (sequences of one
    length together), then the pixel decodes of them all."""
    order = sorted(range(len(probes)), key=lambda i: probes[i][1])
    logits = []
    for t in sorted({t for _, t in probes}):
        rows = [step_rows[t][probes[i][0]] for i in order if probes[i][1] == t]
        logits.append(run.decode(step_tokens[t][torch.tensor(rows, device=pixels.device)]))
    images = torch.tensor([probes[i][0] for i in order], device=pixels.device)
    error = check_finite(pixel_errors(model, torch.cat(logits), pixels[images]).cpu()).tolist()  # one device sync
    values = [0.0] * len(probes)
    for position, i in enumerate(order):
        values[i] = error[position]
    return values


def require_predictor(model: ALITModel, what: str) -> None:
    """The one check that ``what`` (a rule, a method) has the length predictor it needs: ValueError saying how to fit
    one otherwise."""
    if model.length_predictor is None:
        raise InputError(f"{what} needs a model with a length predictor, and this model has none; fit one with "
                                "`adaptive-tokenizer fit-length-predictor --model MODEL PHOTOS... -o OUT_DIR` (a few "
                                "minutes on a CPU) and load OUT_DIR, or use length_rule='exact' or 'search' (they "
                                "need none)")
