"""Fit a length predictor for any model: measure each training image's error at every length, fit the head.

    adaptive-tokenizer fit-length-predictor --model MODEL PHOTOS... -o OUT_DIR

1. **Measure** (:func:`measure`): one rollout per view of every image (the library's centre crop, its mirror image,
   and ``crops`` random square crops of 55-100% of the short side) decodes every length once and records the
   predictor's input features (all groups of ``PREDICTOR_FEATURES``) and the mean absolute pixel error at every
   length.
2. **Split** the images (not the views) by file name: the ``ceil(val_fraction * n)`` names with the smallest
   sha256 are held out, as in ``training/``; the views of one image stay on one side.
3. **Fit** (:func:`fit_head`) every candidate of a small grid (feature groups x hidden width) on the training views:
   full-batch AdamW on the mean squared error of the log errors, standardised inputs, fixed seed.
4. **Select** by a criterion fixed before looking at any result (:func:`agreement`): the candidate whose predicted
   lengths agree, within one iteration, with the exact rule's for the most held-out images, over the thresholds
   whose exact-rule mean lengths are closest to 2, 3, 4, 5 and 6 iterations; ties go to the lower mean absolute
   error of the predicted errors. The held-out numbers of every candidate are written to ``fit_report.json``.
   Then the safety **margin** (:func:`select_margin`): at the predicted rule's own target for half the maximum
   length on average, the margin in 0, 0.01, ..., 0.30 whose share of held-out images reaching the target most
   exceeds a fixed budget of that length's share, among the margins that keep the lengths within one iteration of
   the exact rule's for at least 85% of the images (the smallest such margin on ties; 0 when none does).
5. **Write** the model with the selected head (``config.json`` describes it, ``model.safetensors`` holds it).
6. Optionally **cross-validate** (:func:`cross_validation`): refit the selected head (features, width) ``folds``
   times, each time without one fold of the images (folds by sha256 rank, fold 0 the held-out images when
   ``folds`` is ``1 / val_fraction``), and judge the predicted rule, with the selected margin, on every image's
   out-of-fold estimates: a fair figure of what the head does on images it was not fitted on (the selection
   itself looked at fold 0 only).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch import Tensor

from .errors import InputError
from .config import PREDICTOR_FEATURES, LengthPredictorConfig
from .image_io import open_image, pil_to_tensor
from .io_utils import write_atomic
from .length_predictor import LengthPredictor, feature_sizes
from .length_report import predicted_rule_at_mean_length, threshold_for_mean_length
from .length_rules import choose_iterations, first_iteration_features
from .model import ALITModel
from .rollout import RolloutRun, pixel_errors

# The grid searched by default: feature groups x hidden width. (A first look, on 184 corpus images: linear heads
# and the encoder's features overfit or underfit; the pixel statistics with a small MLP did best.)
FEATURE_CHOICES: tuple[tuple[str, ...], ...] = (
    ("pixels",),
    ("pixels", "base"),
    PREDICTOR_FEATURES,
)
HIDDEN_CHOICES = (32, 128)
TARGET_ITERATIONS = (2, 3, 4, 5, 6)


@dataclass
class Measurements:
    """Per view: all-group features ``[M, F]``, errors ``[M, I]`` at every length, image index ``[M]``."""

    features: Tensor
    errors: Tensor
    image: Tensor
    names: list[str]


def views(image: Image.Image, size: int, crops: int, rng: random.Random) -> list[Tensor]:
    """The centre crop, its mirror image and ``crops`` random square crops, each ``[3, size, size]``."""
    out = [pil_to_tensor(image, size), pil_to_tensor(ImageOps.mirror(image), size)]
    width, height = image.size
    for _ in range(crops):
        side = max(1, int(min(width, height) * rng.uniform(0.55, 1.0)))
        left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        crop = image.crop((left, top, left + side, top + side))
        out.append(pil_to_tensor(ImageOps.mirror(crop) if rng.random() < 0.5 else crop, size))
    return out


@torch.inference_mode()
def measure_batch(model: ALITModel, pixels: Tensor, groups: tuple[str, ...] = PREDICTOR_FEATURES,
                  halting_confidence: float | None = None) -> tuple[Tensor, Tensor]:
    """One rollout of ``pixels`` decoding every length: (features ``[n, F]``, errors ``[n, max_iterations]``)."""
    iterations = model.config.max_iterations
    run = RolloutRun(model, pixels, iterations, halting_confidence=halting_confidence)
    errors = []
    for t in range(iterations):
        latents = run.encode_step()
        if t == 0:
            features = first_iteration_features(model, run, latents, groups).cpu()
        vectors, ids = run.all_tokens(latents)
        logits = run.decode(ids if ids is not None else vectors)
        if halting_confidence is not None:
            run.halt(run.code_prob(logits))
        errors.append(pixel_errors(model, logits, run.pixels).cpu())
    return features, torch.stack(errors, dim=1)


def measure(model: ALITModel, paths: Sequence[str | Path], *, crops: int = 0, seed: int = 0,
            halting_confidence: float | None = None, progress=None) -> Measurements:
    """Features and errors of every view of every image in ``paths`` (see the module docstring)."""
    rng = random.Random(seed)
    size = model.config.image_size
    device, dtype = model.base.codebook.device, model.base.codebook.dtype
    features, errors, image_index = [], [], []
    for index, path in enumerate(paths):
        batch = torch.stack(views(open_image(path), size, crops, rng)).to(device=device, dtype=dtype)
        f, e = measure_batch(model, batch, halting_confidence=halting_confidence)
        features.append(f)
        errors.append(e)
        image_index.append(torch.full((len(batch),), index))
        if progress is not None:
            progress(1)
    return Measurements(torch.cat(features), torch.cat(errors), torch.cat(image_index), [str(p) for p in paths])


def group_columns(config_groups: tuple[str, ...], sizes: dict[str, int]) -> Tensor:
    """Column indices of ``config_groups`` inside the all-group feature vector."""
    columns, start = [], 0
    for name in PREDICTOR_FEATURES:
        if name in config_groups:
            columns.extend(range(start, start + sizes[name]))
        start += sizes[name]
    return torch.tensor(columns)


def fit_head(model: ALITModel, features: Tensor, errors: Tensor, groups: tuple[str, ...], hidden: int, *,
             steps: int = 1500, lr: float = 3e-3, weight_decay: float = 0.1, seed: int = 0) -> LengthPredictor:
    """Fit a :class:`LengthPredictor` (``groups``, ``hidden``) on all-group ``features`` ``[M, F]`` and errors
    ``[M, I]``: full-batch AdamW on the squared error of log errors, inputs standardised. Deterministic."""
    columns = group_columns(groups, feature_sizes(model.config))
    x = features[:, columns].double()
    head_config = LengthPredictorConfig(features=groups, hidden=hidden, num_inputs=len(columns))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = LengthPredictor(model.config.replace(length_predictor=head_config))
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    head.feature_mean.copy_(mean.float())
    head.feature_std.copy_(std.float())
    inputs = ((x - mean) / std).float()
    target = errors.float().clamp(min=1e-6).log()
    optimizer = torch.optim.AdamW(head.net.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = (head.net(inputs) - target).pow(2).mean()
            loss.backward()
            optimizer.step()
    return head.eval().requires_grad_(False)


def target_thresholds(errors: Tensor, targets: Sequence[int] = TARGET_ITERATIONS) -> list[float]:
    """For each target mean length (in iterations), the threshold at which the exact rule's mean length on
    ``errors`` ``[N, I]`` is closest to it."""
    iterations = list(range(1, errors.shape[1] + 1))
    return [threshold_for_mean_length(errors, iterations, target) for target in targets]


def agreement(predicted: Tensor, errors: Tensor, thresholds: Sequence[float]) -> dict[str, float]:
    """How the predicted rule's lengths compare with the exact rule's, averaged over ``thresholds``: share of
    images with the same length and within one iteration, and the mean absolute error of the predicted errors."""
    exact = choose_iterations(errors, thresholds)
    guess = choose_iterations(predicted, thresholds)
    difference = (exact - guess).abs()
    return {"same": float((difference == 0).double().mean()), "within_one": float((difference <= 1).double().mean()),
            "mae": float((predicted - errors).abs().mean())}


def held_out_images(names: Sequence[str], val_fraction: float) -> set[int]:
    """Indices of the ``ceil(val_fraction * n)`` names with the smallest sha256 (as ``training.data``)."""
    count = math.ceil(val_fraction * len(names)) if val_fraction > 0 else 0
    return set(by_hash(names)[:count])


def by_hash(names: Sequence[str]) -> list[int]:
    """Indices of ``names`` sorted by sha256(name)."""
    return sorted(range(len(names)), key=lambda i: hashlib.sha256(names[i].encode()).hexdigest())


def centre_views(data: Measurements) -> Tensor:
    """Bool ``[M]``: the first view of every image (its centre crop, as the library sees it)."""
    first = torch.ones(len(data.image), dtype=torch.bool)
    first[1:] = data.image[1:] != data.image[:-1]
    return first


def image_folds(names: Sequence[str], folds: int) -> Tensor:
    """Fold ``[n]`` of every image: its rank by sha256(name) x folds // n, so there are exactly ``folds`` folds of
    near-equal size and fold 0 holds the names that :func:`held_out_images` holds out at ``val_fraction = 1 / folds``.
    """
    if not 2 <= folds <= len(names):
        raise InputError(f"cross-validation needs 2 <= folds <= the number of images ({len(names)}), got {folds}")
    fold = torch.empty(len(names), dtype=torch.long)
    fold[torch.tensor(by_hash(names))] = torch.arange(len(names)) * folds // len(names)
    return fold


def cross_validation(model: ALITModel, data: Measurements, names: Sequence[str], groups: tuple[str, ...],
                     hidden: int, margin: float, folds: int, *, seed: int = 0, steps: int = 1500) -> dict:
    """The predicted rule on out-of-fold estimates (module docstring, step 6): for each fold a head
    (``groups``, ``hidden``) fitted on the views of the other folds estimates the fold's centre crops; then, at the
    rule's own target for 2..6 iterations of mean length, the share of images reaching the target against a fixed
    budget of that length, and the agreement with the exact rule's lengths."""
    fold = image_folds(names, folds)
    view_fold, centre = fold[data.image], centre_views(data)
    columns = group_columns(groups, feature_sizes(model.config))
    predicted = torch.zeros(len(names), data.errors.shape[1], dtype=data.errors.dtype)
    for k in range(int(fold.max()) + 1):
        head = fit_head(model, data.features[view_fold != k], data.errors[view_fold != k], groups, hidden,
                        seed=seed, steps=steps)
        rows = centre & (view_fold == k)
        with torch.inference_mode():
            predicted[data.image[rows]] = head(data.features[rows][:, columns]).to(predicted.dtype)
    errors = data.errors[centre]
    step = model.config.tokens_per_iteration
    budgets = [step * i for i in range(1, errors.shape[1] + 1)]
    targets = []
    for iterations in TARGET_ITERATIONS:
        own = predicted_rule_at_mean_length(predicted, errors, budgets, step * iterations, margin)
        own.pop("chosen")
        targets.append({"mean_tokens": step * iterations, **own, "gain_over_fixed": own["share"] - own["fixed_share"]})
    return {"folds": folds, "features": list(groups), "hidden": hidden, "margin": margin,
            "mae": float((predicted - errors).abs().mean()), "targets": targets}


def select_head(model: ALITModel, data: Measurements, names: Sequence[str], *, val_fraction: float = 0.1,
                feature_choices=FEATURE_CHOICES, hidden_choices=HIDDEN_CHOICES, seed: int = 0, steps: int = 1500,
                log=print) -> tuple[LengthPredictor, dict]:
    """Fit every candidate on the training images' views, select on the held-out images' centre crops."""
    held = held_out_images(names, val_fraction)
    is_val = torch.tensor([int(i) in held for i in data.image])
    val = is_val & centre_views(data)  # the held-out images as the library sees them (centre crops)
    train = ~is_val
    if not val.any() or not train.any():
        raise InputError(f"need images on both sides of the split: {int(train.sum())} training views, "
                         f"{int(val.sum())} held-out images; give more images or another val_fraction")
    thresholds = target_thresholds(data.errors[val])
    rows, best = [], None
    for groups in feature_choices:
        for hidden in hidden_choices:
            head = fit_head(model, data.features[train], data.errors[train], groups, hidden, seed=seed, steps=steps)
            columns = group_columns(groups, feature_sizes(model.config))
            with torch.inference_mode():
                predicted = head(data.features[val][:, columns])
            scores = agreement(predicted, data.errors[val], thresholds)
            rows.append({"features": list(groups), "hidden": hidden, **scores})
            log(f"features {'+'.join(groups)}, hidden {hidden}: within one {scores['within_one']:.3f}, "
                f"same {scores['same']:.3f}, MAE {scores['mae']:.4f}")
            key = (scores["within_one"], -scores["mae"])
            if best is None or key > best[0]:
                best = (key, head, groups, hidden)
    _, head, groups, hidden = best
    columns = group_columns(groups, feature_sizes(model.config))
    with torch.inference_mode():
        predicted = head(data.features[val][:, columns])
    head.margin, margins = select_margin(predicted, data.errors[val])
    report = {"criterion": "highest share of held-out images whose predicted length is within one iteration of the "
                           "exact rule's, averaged over the thresholds whose exact mean lengths are closest to "
                           f"{list(TARGET_ITERATIONS)} iterations; ties: lower MAE",
              "thresholds": thresholds, "num_train_views": int(train.sum()), "num_val_images": int(val.sum()),
              "candidates": rows, "selected": {"features": list(groups), "hidden": hidden, "margin": head.margin},
              "margins": margins}
    return head, report


def select_margin(predicted: Tensor, errors: Tensor, min_within_one: float = 0.85) -> tuple[float, list[dict]]:
    """The safety margin (see the module docstring) for estimates ``[N, I]`` and measured ``errors``; returns it
    and every margin's numbers."""
    iterations = errors.shape[1]
    budgets = list(range(1, iterations + 1))
    rows, best = [], (None, 0.0)
    for step in range(31):
        margin = step / 100
        own = predicted_rule_at_mean_length(predicted, errors, budgets, iterations / 2, margin)
        gain = own["share"] - own["fixed_share"]
        rows.append({"margin": margin, "threshold": own["threshold"], "share": own["share"],
                     "fixed_share": own["fixed_share"], "within_one": own["within_one_of_exact"]})
        if own["within_one_of_exact"] >= min_within_one and (best[0] is None or gain > best[0] + 1e-12):
            best = (gain, margin)
    return best[1], rows


def with_predictor(model: ALITModel, head: LengthPredictor) -> ALITModel:
    """A copy of ``model`` whose config and weights include ``head``."""
    head_config = LengthPredictorConfig(features=head.groups, hidden=head.net[0].out_features
                                        if len(head.net) > 1 else 0, num_inputs=head.feature_mean.numel(),
                                        margin=head.margin)
    config = model.config.replace(length_predictor=head_config)
    out = ALITModel(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("length_predictor.")}
    state.update({f"length_predictor.{k}": v for k, v in head.state_dict().items()})
    out.load_state_dict(state, strict=True)
    return out.eval().requires_grad_(False)


def write_report(path: Path, report: dict) -> None:
    write_atomic(path, (json.dumps(report, indent=1) + "\n").encode())


def fit_length_predictor(tok, paths: Sequence[str | Path], out_dir: str | Path, *, crops: int = 0,
                         val_fraction: float = 0.1, seed: int = 0, measurements: str | Path | None = None,
                         steps: int = 1500, folds: int = 0, progress=None, log=print) -> dict:
    """The ``fit-length-predictor`` command: measure ``paths`` (or load ``measurements``, a file this function
    wrote before for the same model and images), select and fit the head, write the model with it to
    ``out_dir`` (``save_pretrained``) and ``out_dir/fit_report.json``; with ``folds`` >= 2 the report also holds
    the selected head's :func:`cross_validation`. Returns the report."""
    from safetensors.torch import load_file, save

    names = [Path(p).name for p in paths]
    if folds:
        image_folds(names, folds)  # a bad count fails before the measuring, not after it
    cache = Path(measurements) if measurements is not None else None
    if cache is not None and cache.is_file():
        stored = load_file(cache)
        data = Measurements(stored["features"], stored["errors"], stored["image"], [str(p) for p in paths])
        if int(data.image.max()) + 1 != len(paths):
            raise InputError(f"{cache} holds measurements of {int(data.image.max()) + 1} images, not the "
                             f"{len(paths)} given; delete it or pass the same images")
    else:
        data = measure(tok.model, paths, crops=crops, seed=seed,
                       halting_confidence=tok.config.dynamic_halting_confidence if tok.config.dynamic_halting else None,
                       progress=progress)
        if cache is not None:
            write_atomic(cache, save({"features": data.features, "errors": data.errors, "image": data.image}))
    head, report = select_head(tok.model, data, names, val_fraction=val_fraction, seed=seed, steps=steps, log=log)
    if folds:
        report["cross_validation"] = cross_validation(tok.model, data, names, head.groups, report["selected"]["hidden"],
                                                      head.margin, folds, seed=seed, steps=steps)
    from .tokenizer import AdaptiveTokenizer
    fitted = AdaptiveTokenizer(with_predictor(tok.model, head), info=tok.info)  # a new float32 CPU model
    out_dir = Path(out_dir)
    fitted.save_pretrained(out_dir)
    report.update({"num_images": len(paths), "crops_per_image": crops, "seed": seed})
    write_report(out_dir / "fit_report.json", report)
    return report
