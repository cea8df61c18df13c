"""Compare per-image stopping rules offline, on one rollout per image: which length each rule picks at the threshold
whose mean length is closest to ``--target-tokens`` (128), the mean L1 it reaches against a fixed budget for all,
and how well its lengths follow image complexity (Spearman against JPEG bytes per pixel, as ``evaluate``).

    python -m training.stopping_rules evaluation/photos [--model FOLDER]
    python -m training.stopping_rules ../shared/corpus/photos --split runs/alit17/split.json --floor-weights

``--split``: the held-out (``val``) files of a run's ``split.json`` under the folder, not the whole folder.

Rules (each image takes the first length whose quantity is ``<=`` the threshold, else its lowest):

* ``l1_input``: L1 of the (unclamped) reconstruction against the input: the authors' rule, what
  ``encode(halt_threshold=...)`` compares;
* ``l1_floor(w)``: that L1 minus ``w`` times the base tokenizer's own (unclamped) L1 on the image (:func:`floor_score`;
  the rule the first releases shipped as ``length_floor_weight``, no longer part of the library: see
  ``--floor-weights``);
* ``l1_base``: L1 against the base tokenizer's own reconstruction (the distillation target);
* ``entropy``: mean entropy (nats) of the decoder's distribution over the base codes.

Bounds, knowing every image's L1 at every length: ``best`` (:func:`adaptive_tokenizer.evaluation.best_allocation`)
and ``best_rho>=0.6``, a seeded random search (simulated annealing, mean length fixed at the target) for the
lowest mean L1 whose lengths keep Spearman >= 0.6; a search, so an upper bound on that optimum.

``--floor-weights``: ``l1_floor(w)`` for w = 0, 0.01, ..., 1 and the selection the second release's
``length_floor_weight`` was made by (on held-out files, never on the evaluation photos): the weight with the
highest Spearman among those whose mean L1 is below the fixed budget's (the smallest such weight on ties).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from adaptive_tokenizer import AdaptiveTokenizer
from adaptive_tokenizer.evaluation import TARGET_TOKENS, base_pixels, best_allocation, jpeg_complexity
from adaptive_tokenizer.image_io import list_image_files, load_images
from adaptive_tokenizer.length_rules import choose_iterations
from adaptive_tokenizer.metrics import l1_error
from adaptive_tokenizer.rollout import IterationRecord, rollout
from adaptive_tokenizer.stats import spearman


def floor_score(error: torch.Tensor, base_error: torch.Tensor, weight: float) -> torch.Tensor:
    """``error - weight * base_error``: the reconstruction error above a share of the base tokenizer's own."""
    return error - weight * base_error


def per_image_curves(tok: AdaptiveTokenizer, inputs: torch.Tensor) -> dict[str, np.ndarray]:
    """``[N, I]`` arrays: ``l1`` (clamped reconstruction against the input, the score), the rules' quantities and
    ``base_error`` ``[N, 1]`` (the base tokenizer's own unclamped L1)."""
    base = base_pixels(tok, inputs)
    records: list[IterationRecord] = []
    with torch.inference_mode():
        rollout(tok.model, inputs.to(device=tok.device, dtype=tok.dtype), tok.config.max_iterations,
                trace=records.append)
    curves = {"l1": [], "l1_input": [], "l1_base": [], "entropy": []}
    for record in records:
        reconstruction = record.reconstruction.float().clamp(0, 1).cpu()
        curves["l1"].append(l1_error(reconstruction, inputs))
        curves["l1_input"].append(record.error.float().cpu())
        curves["l1_base"].append(l1_error(reconstruction, base))
        probs = record.logits.float().softmax(-1)
        curves["entropy"].append(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean(1).cpu())
    curves = {name: torch.stack(values, 1).double().numpy() for name, values in curves.items()}
    curves["base_error"] = tok.base_errors(inputs).double().numpy()[:, None]
    return curves


def rule_lengths(quantity: np.ndarray, target_units: float) -> np.ndarray:
    """Iteration indices ``[N]`` of the threshold whose mean length (in iterations) is closest to the target (the
    first such threshold, trying every observed value); the rule itself is ``length_rules.choose_iterations``."""
    chosen = choose_iterations(torch.from_numpy(quantity), np.unique(quantity)).numpy()  # [T, N]
    gaps = np.abs((chosen + 1).mean(1) - target_units)
    return chosen[int(np.argmin(gaps))]


def floor_weight_sweep(l1: np.ndarray, errors: np.ndarray, base_errors: np.ndarray, complexity: np.ndarray,
                       target_units: float, weights: np.ndarray | None = None) -> tuple[list[dict], float | None]:
    """``l1_floor(w)`` for each weight (default 0, 0.01, ..., 1): rows ``{weight, mean_l1, spearman}``, and the
    selected weight: the highest Spearman among weights whose mean L1 is below the fixed budget's (ties: the
    smallest weight), None when no weight beats it."""
    weights = np.round(np.arange(0, 1.0001, 0.01), 2) if weights is None else weights
    fixed_l1 = l1[:, int(round(target_units)) - 1].mean()
    rows, selected = [], None
    for weight in weights:
        quantity = floor_score(torch.from_numpy(errors), torch.from_numpy(base_errors), float(weight)).numpy()
        chosen = rule_lengths(quantity, target_units)
        row = {"weight": float(weight), "mean_l1": float(l1[np.arange(len(l1)), chosen].mean()),
               "spearman": spearman(chosen + 1, complexity), "mean_units": float((chosen + 1).mean())}
        rows.append(row)
        if row["mean_l1"] < fixed_l1 and (selected is None or row["spearman"] > selected["spearman"]):
            selected = row
    return rows, None if selected is None else selected["weight"]


def constrained_search(l1: np.ndarray, complexity: np.ndarray, target_units: int, min_rho: float = 0.6,
                       seed: int = 0, restarts: int = 20, moves: int = 20000) -> np.ndarray:
    """Simulated annealing over allocations with mean length ``target_units`` iterations: the lowest mean L1 whose
    lengths have Spearman >= ``min_rho`` with complexity (penalised below it)."""
    rng = np.random.default_rng(seed)
    num_images, iterations = l1.shape
    rows = np.arange(num_images)

    def score(chosen: np.ndarray) -> float:
        rho = spearman(chosen, complexity)
        rho = -1.0 if rho != rho else rho  # constant lengths: no correlation
        return l1[rows, chosen].mean() + 10 * max(0.0, min_rho - rho)

    best, best_score = None, float("inf")
    for _ in range(restarts):
        chosen = np.full(num_images, target_units - 1)
        current, temperature = score(chosen), 0.01
        if current < best_score:  # the fixed allocation, should no move beat it
            best, best_score = chosen.copy(), current
        for _ in range(moves):
            up, down = rng.integers(num_images, size=2)
            step = int(rng.integers(1, 3))
            proposal = chosen.copy()
            proposal[up] += step
            proposal[down] -= step
            temperature *= 0.9995
            if proposal.min() < 0 or proposal.max() >= iterations:
                continue
            candidate = score(proposal)
            if candidate < current or rng.random() < np.exp((current - candidate) / temperature):
                chosen, current = proposal, candidate
                if current < best_score:
                    best, best_score = chosen.copy(), current
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.stopping_rules", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--model", default=None, help="model folder or name (default: the embedded default model)")
    parser.add_argument("--target-tokens", type=int, default=TARGET_TOKENS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", help="a run's split.json: only its held-out files under FOLDER")
    parser.add_argument("--floor-weights", action="store_true", help="sweep l1_floor(w) and select w (see above)")
    args = parser.parse_args(argv)

    tok = AdaptiveTokenizer.from_pretrained(args.model)
    if args.split:
        paths = [Path(args.folder) / name for name in json.loads(Path(args.split).read_text())["val"]]
    else:
        paths = list_image_files(args.folder)
    inputs = load_images([str(p) for p in paths], tok.config.image_size)
    curves = per_image_curves(tok, inputs)
    complexity = np.array([jpeg_complexity(image) for image in inputs])
    l1, base_errors = curves.pop("l1"), curves.pop("base_error")
    target_units = args.target_tokens / tok.tokens_per_iteration
    rows = np.arange(len(paths))
    choices = {name: rule_lengths(quantity, target_units) for name, quantity in curves.items()}
    choices["best"] = best_allocation(torch.from_numpy(l1), target_units).numpy()
    if float(target_units).is_integer():
        choices["best_rho>=0.6"] = constrained_search(l1, complexity, int(target_units), seed=args.seed)
    fixed_index = int(round(target_units)) - 1
    print(f"{len(paths)} images from {args.folder}; fixed {tok.tokens_per_iteration * (fixed_index + 1)} tokens: "
          f"L1 {l1[:, fixed_index].mean():.4f}")
    print("| rule | mean tokens | mean L1 | Spearman(length, complexity) | images per length |")
    print("|---|---|---|---|---|")
    for name, chosen in choices.items():
        lengths = tok.tokens_per_iteration * (chosen + 1)
        histogram = "/".join(str(c) for c in np.bincount(chosen, minlength=l1.shape[1]))
        print(f"| {name} | {lengths.mean():.1f} | {l1[rows, chosen].mean():.4f} | "
              f"{spearman(lengths, complexity):+.2f} | {histogram} |")
    if args.floor_weights:
        sweep, selected = floor_weight_sweep(l1, curves["l1_input"], base_errors, complexity, target_units)
        print("\n| w | mean tokens | mean L1 | Spearman(length, complexity) |\n|---|---|---|---|")
        for row in sweep:
            if round(row["weight"] * 100) % 5 == 0 or row["weight"] == selected:
                print(f"| {row['weight']:.2f} | {tok.tokens_per_iteration * row['mean_units']:.1f} | "
                      f"{row['mean_l1']:.4f} | {row['spearman']:+.3f} |")
        print(f"selected length_floor_weight: {selected} (highest Spearman among weights whose mean L1 is below the "
              f"fixed {tok.tokens_per_iteration * (fixed_index + 1)} tokens' {l1[:, fixed_index].mean():.4f})")


if __name__ == "__main__":
    main()
