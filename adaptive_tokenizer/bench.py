"""Speed benchmark: the authors' encode algorithm against our rollout, side by side in one process.

Same weights (random), same inputs, threads fixed. Measures images/s and peak memory of:

1. ``reference``: the authors' ``encode()`` algorithm, reproduced faithfully with our modules: all iterations,
   the decoder at every iteration, a pixel decode at every iteration, one length for the whole batch (first
   iteration whose batch-mean error is below the threshold, else the lowest);
2. ``fixed<B>``: ours at fixed budgets;
3. ``adaptive``: ours with ``halt_threshold`` (per image, early exit), at the threshold whose mean chosen length
   is closest to ``--target-tokens``; its chosen lengths are checked against the authors' rule applied to each
   image alone;
4. ``recurrent`` vs ``cached`` rollout at equal size, 256 tokens.

The last line printed is one JSON object with the ratios (images/s over images/s).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import InputError
from .config import ModelConfig
from .model import ALITModel
from .presets import get_preset, list_presets
from .rollout import IterationRecord, rollout
from .tokenizer import DTYPES


def random_model(config: ModelConfig, seed: int = 0) -> ALITModel:
    """A model of ``config`` with random weights of realistic scale (speed does not depend on the values)."""
    torch.manual_seed(seed)
    model = ALITModel(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.GroupNorm)):
                continue  # torch's default initialisation
            for param in module.parameters(recurse=False):
                param.normal_(0, 0.5)  # embeddings, mask/class tokens, codebooks
    return model.eval()


def reference_choice(errors: torch.Tensor, threshold: float) -> int:
    """The authors' rule on errors ``[I]``: first iteration whose running minimum is below the threshold, else
    the lowest error. Returns the 0-based iteration."""
    best, best_iteration = float("inf"), 0
    for iteration, error in enumerate(errors.tolist()):
        if error < best:
            best, best_iteration = error, iteration
        if best < threshold:
            return best_iteration
    return best_iteration


def reference_encode(model: ALITModel, pixels: torch.Tensor, threshold: float) -> tuple[int, torch.Tensor]:
    """The authors' encode(): every iteration decoded to pixels; one length for the batch.

    Returns (chosen 0-based iteration for the batch, per-image errors ``[N, I]``).
    """
    records: list[IterationRecord] = []
    rollout(model, pixels, model.config.max_iterations,
            halting_confidence=model.config.dynamic_halting_confidence if model.config.dynamic_halting else None,
            trace=records.append)
    errors = torch.stack([r.error.cpu() for r in records], dim=1)
    return reference_choice(errors.mean(dim=0), threshold), errors


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or the process RSS sampled every 2 ms on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss() - self.base)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self.base)


class HostSyncCounter(TorchDispatchMode):
    """Counts the operations that make the host wait for the device: reading a value (``.item()``, ``bool()``,
    ``if tensor``: ``aten._local_scalar_dense``), ``nonzero`` (its size depends on the data) and copies from a
    non-CPU device to the CPU. On a CPU the copies are not seen (``.cpu()`` and ``.tolist()`` of a CPU tensor
    dispatch nothing), so a CPU count is a lower bound of a CUDA one; the first two are counted anywhere.

    >>> with torch.no_grad(), HostSyncCounter() as syncs:   # not under inference_mode: it hides ops from the mode
    ...     rollout(model, pixels, 4)
    >>> syncs.count
    """

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.count, self.ops = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        to_cpu = name in ("aten::_to_copy", "aten::copy_") and self._device_to_host(name, args, kwargs)
        if name in self.SYNCING or to_cpu:
            self.count += 1
            self.ops.append(name)
        return func(*args, **kwargs)

    @staticmethod
    def _device_to_host(name: str, args: tuple, kwargs: dict) -> bool:
        if name == "aten::_to_copy":
            source, target = args[0], kwargs.get("device")
            return target is not None and torch.device(target).type == "cpu" and source.device.type != "cpu"
        target, source = args[0], args[1]
        return target.device.type == "cpu" and isinstance(source, torch.Tensor) and source.device.type != "cpu"


@dataclass
class Measurement:
    name: str
    images_per_s: float
    peak_mib: float
    note: str = ""


def measure(name: str, fn: Callable[[], object], batch: int, device: torch.device, repeats: int,
            note: str = "") -> tuple[Measurement, object]:
    """Best of ``repeats`` timed runs; the first run also gives the peak memory. (No separate warm-up: every
    measured call runs for seconds, so one-time costs are negligible; use ``--repeats 2`` to rule them out.)"""
    times, out, peak = [], None, 0.0
    for run in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with PeakMemory(device) as memory, torch.inference_mode():
            start = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        peak = max(peak, memory.peak)
    return Measurement(name, batch / min(times), peak / 2**20, note), out


def run_benchmark(preset: str | ModelConfig, batch: int, threads: int, device: str, dtype: str, repeats: int,
                  target_tokens: int, budgets: list[int], per_image_check: bool,
                  print_fn: Callable[[str], None] = print) -> dict:
    """Run every measurement (see the module docstring); print a table, then one JSON line; return the JSON."""
    if batch < 1 or threads < 1 or repeats < 1:
        raise InputError("batch, threads and repeats must be positive")
    config = get_preset(preset) if isinstance(preset, str) else preset
    if any(b % config.tokens_per_iteration or not 0 < b <= config.max_tokens for b in budgets):
        raise InputError(f"budgets must be multiples of {config.tokens_per_iteration} up to {config.max_tokens}")
    preset = preset if isinstance(preset, str) else "custom"
    torch.set_num_threads(threads)
    device_ = torch.device(device)
    dtype_ = DTYPES[dtype]
    recurrent = random_model(config.replace(rollout="recurrent")).to(device_, dtype_)
    cached = random_model(config.replace(rollout="cached")).to(device_, dtype_)
    ours = cached if config.rollout == "cached" else recurrent
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(batch, 3, config.image_size, config.image_size, generator=generator).to(device_)
    per = config.tokens_per_iteration
    print_fn(f"preset {preset}: width {config.encoder_width}, {config.encoder_layers}+{config.decoder_layers} "
             f"layers, {config.image_size} px, rollout {config.rollout}; batch {batch}, {threads} threads, "
             f"{device_} {dtype}, best of {repeats}")

    results: list[Measurement] = []
    # The authors' algorithm computes every error before choosing, so its timed run also gives the errors with
    # which the adaptive threshold is calibrated; its batch-level choice is then a few comparisons.
    reference, (_, errors) = measure("reference (authors' encode)", lambda: reference_encode(ours, pixels, 0.0),
                                     batch, device_, repeats,
                                     "8 iterations, decoder + pixel decode each, batch-level length")
    results.append(reference)

    def mean_tokens(threshold: float) -> float:
        return per * (1 + sum(reference_choice(row, threshold) for row in errors) / len(errors))

    candidates = sorted(set(errors.flatten().tolist()))
    thresholds = [(a + b) / 2 for a, b in zip(candidates, candidates[1:])] or candidates
    threshold = min(thresholds, key=lambda thr: abs(mean_tokens(thr) - target_tokens))
    batch_choice = reference_choice(errors.mean(dim=0), threshold)
    for budget in budgets:
        m, _ = measure(f"fixed {budget}", lambda b=budget: rollout(ours, pixels, b // per), batch, device_, repeats)
        results.append(m)
    adaptive, out = measure("adaptive", lambda: rollout(ours, pixels, config.max_iterations,
                                                         target_error=threshold),
                            batch, device_, repeats, f"threshold {threshold:.6f}")
    chosen = [int(n) for n in out.num_iterations]  # type: ignore[attr-defined]
    per_image = [reference_choice(row, threshold) + 1 for row in errors]
    if per_image_check:  # the authors' encode() run on each image alone
        per_image = [reference_encode(ours, pixels[i : i + 1], threshold)[0] + 1 for i in range(batch)]
    agree = chosen == per_image
    adaptive.note += f", mean {per * sum(chosen) / batch:.0f} tokens, per-image agreement with reference: {agree}"
    results.append(adaptive)
    rec, _ = measure("recurrent 256", lambda: rollout(recurrent, pixels, config.max_iterations), batch, device_, repeats)
    cac, _ = measure("cached 256", lambda: rollout(cached, pixels, config.max_iterations), batch, device_, repeats)
    results += [rec, cac]

    print_fn(f"{'what':<28} {'images/s':>10} {'vs reference':>13} {'peak MiB':>10}  note")
    for m in results:
        print_fn(f"{m.name:<28} {m.images_per_s:>10.3f} {m.images_per_s / reference.images_per_s:>12.2f}x "
                 f"{m.peak_mib:>10.0f}  {m.note}")
    fixed64 = next((m for m in results if m.name == "fixed 64"), None)
    summary = {
        "preset": preset, "batch": batch, "threads": threads, "device": str(device_), "dtype": dtype,
        "fixed64_vs_reference": round(fixed64.images_per_s / reference.images_per_s, 3) if fixed64 else None,
        "adaptive_vs_reference": round(adaptive.images_per_s / reference.images_per_s, 3),
        "cached_vs_recurrent": round(cac.images_per_s / rec.images_per_s, 3),
        "adaptive_mean_tokens": per * sum(chosen) / batch,
        "adaptive_agrees_with_reference_per_image": agree,
        "reference_batch_tokens": per * (batch_choice + 1),
        "images_per_s": {m.name: round(m.images_per_s, 4) for m in results},
    }
    print_fn(json.dumps(summary))
    return summary


@dataclass
class RuleRow:
    """One row of the rules benchmark: a rule (or the fixed budget) at its own target for the mean length asked."""

    measurement: Measurement
    threshold: float
    iterations: torch.Tensor  # [N] chosen iterations per image
    decodes: torch.Tensor  # [N] lengths decoded to choose them (0: none)
    share_meeting_target: float  # of images whose measured error at their length is <= threshold
    fixed_share_meeting_target: float  # a fixed budget of the mean length asked, at the same threshold


def run_rules_benchmark(tok, pixels: torch.Tensor, threads: int, target_tokens: int, repeats: int = 1,
                        batch: int | None = None, print_fn: Callable[[str], None] = print) -> dict:
    """The length rules side by side on a trained model and real images ``pixels`` ``[N, 3, R, R]``, all of them,
    in batches of ``batch`` (default: one batch): the authors' algorithm, the exact rule (a decode at every
    iteration up to each image's length), the search rule, the verified and predicted rules (the model needs a
    length predictor) and the fixed budget nearest ``target_tokens``. Each rule runs at its own target for
    ``target_tokens`` mean tokens over all images (the search at the exact rule's: the same lengths); every row
    reports images/s, decodes per image, mean tokens and the share of images meeting its target (measured
    errors), beside the share a fixed budget of ``target_tokens`` reaches at that target.
    Prints a table and one JSON line with the ratios of images/s; returns the JSON."""
    from .length_report import threshold_for_mean_length, verified_threshold
    from .length_rules import choose_length, predict_errors

    torch.set_num_threads(threads)
    model, device, count = tok.model, tok.device, len(pixels)
    batch = batch or count
    batches = pixels.to(device).split(batch)
    per, iterations = model.config.tokens_per_iteration, model.config.max_iterations
    budgets = [per * (i + 1) for i in range(iterations)]
    _, errors = tok.reconstructions(pixels)
    exact_e = threshold_for_mean_length(errors, budgets, target_tokens)
    fixed_index = min(range(iterations), key=lambda i: abs(budgets[i] - target_tokens))
    halting = model.config.dynamic_halting_confidence if model.config.dynamic_halting else None

    def run_rule(rule: str, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [choose_length(model, part, iterations, threshold, rule, halting_confidence=halting)
                for part in batches]
        return torch.cat([o.num_iterations for o in outs]), torch.cat([o.decodes for o in outs])

    def row(m: Measurement, threshold: float, chosen: torch.Tensor, decodes: torch.Tensor) -> RuleRow:
        limit = torch.tensor(threshold, dtype=errors.dtype)
        share = float((errors[torch.arange(count), chosen - 1] <= limit).double().mean())
        fixed_share = float((errors[:, fixed_index] <= limit).double().mean())
        m.note = f"target {threshold:.4f}"
        return RuleRow(m, threshold, chosen, decodes, share, fixed_share)

    reference, _ = measure("reference (authors' encode)",
                           lambda: [reference_encode(model, part, exact_e) for part in batches], count, device,
                           repeats, "every length decoded, batch-level length")
    rows: dict[str, RuleRow] = {}
    targets = {"exact": exact_e, "search": exact_e}
    if model.length_predictor is not None:
        with torch.inference_mode():
            predicted = torch.cat([predict_errors(model, part).cpu() for part in batches])
        targets["verified"] = verified_threshold(errors, predicted, budgets, target_tokens)
        margin = model.length_predictor.margin  # the rule compares estimate x (1 + margin) with the target
        targets["predicted"] = threshold_for_mean_length(predicted * (1 + margin), budgets, target_tokens)
    for rule, threshold in targets.items():
        m, (chosen, decodes) = measure(rule, lambda r=rule, e=threshold: run_rule(r, e), count, device, repeats)
        rows[rule] = row(m, threshold, chosen, decodes)
    fixed_budget = budgets[fixed_index]
    fixed, _ = measure(f"fixed {fixed_budget}", lambda: [rollout(model, part, fixed_index + 1,
                                                                   halting_confidence=halting) for part in batches],
                       count, device, repeats)
    rows["fixed"] = row(fixed, exact_e, torch.full((count,), fixed_index + 1), torch.zeros(count, dtype=torch.long))
    fixed.note = f"at the exact rule's target {exact_e:.4f}"
    print_rules_table(reference, rows, per, fixed_budget, print_fn)
    summary = rules_summary(reference, rows, per, count, batch, threads, device, target_tokens, fixed_budget)
    print_fn(json.dumps(summary))
    return summary


def print_rules_table(reference: Measurement, rows: dict[str, RuleRow], tokens_per_iteration: int, fixed_budget: int,
                      print_fn: Callable[[str], None]) -> None:
    """The rules benchmark's table: images/s and its ratio to the authors' algorithm and to the exact rule, decodes
    per image, mean tokens, the share meeting the target and a fixed budget's share at the same target."""
    exact = rows["exact"].measurement.images_per_s
    print_fn(f"{'what':<28} {'images/s':>9} {'vs authors':>10} {'vs exact':>8} {'decodes':>7} {'tokens':>7} "
             f"{'meet E':>7} {f'fixed {fixed_budget}':>9}  note")
    print_fn(f"{reference.name:<28} {reference.images_per_s:>9.3f} {1:>9.2f}x {reference.images_per_s / exact:>7.2f}x"
             f"{'':>35}  {reference.note}")
    for r in rows.values():
        m = r.measurement
        print_fn(f"{m.name:<28} {m.images_per_s:>9.3f} {m.images_per_s / reference.images_per_s:>9.2f}x "
                 f"{m.images_per_s / exact:>7.2f}x {float(r.decodes.double().mean()):>7.2f} "
                 f"{tokens_per_iteration * float(r.iterations.double().mean()):>7.1f} {r.share_meeting_target:>7.1%} "
                 f"{r.fixed_share_meeting_target:>9.1%}  {m.note}")


def rules_summary(reference: Measurement, rows: dict[str, RuleRow], tokens_per_iteration: int, count: int,
                  batch: int, threads: int, device: torch.device, target_tokens: int, fixed_budget: int) -> dict:
    """The rules benchmark's JSON line: ratios of images/s measured in the same run, whether the search gave the
    exact rule's lengths, and each rule's target, decodes per image, mean tokens and share meeting its target."""
    speed = {name: r.measurement.images_per_s for name, r in rows.items()}
    summary = {"mode": "rules", "images": count, "batch": batch, "threads": threads, "device": str(device),
               "target_tokens": target_tokens, "fixed_budget": fixed_budget,
               "search_vs_exact": round(speed["search"] / speed["exact"], 3),
               "search_same_lengths_as_exact": float((rows["search"].iterations == rows["exact"].iterations)
                                                     .double().mean()),
               "exact_vs_reference": round(speed["exact"] / reference.images_per_s, 3)}
    for rule in ("verified", "predicted"):
        if rule in rows:
            summary.update({f"{rule}_vs_exact": round(speed[rule] / speed["exact"], 3),
                            f"{rule}_vs_search": round(speed[rule] / speed["search"], 3),
                            f"{rule}_vs_reference": round(speed[rule] / reference.images_per_s, 3),
                            f"{rule}_vs_fixed": round(speed[rule] / speed["fixed"], 3)})
    summary["rules"] = {name: {"target": r.threshold, "images_per_s": round(speed[name], 4),
                               "decodes_per_image": round(float(r.decodes.double().mean()), 4),
                               "mean_tokens": round(tokens_per_iteration * float(r.iterations.double().mean()), 2),
                               "share_meeting_target": round(r.share_meeting_target, 4),
                               "fixed_share_meeting_target": round(r.fixed_share_meeting_target, 4)}
                        for name, r in rows.items()}
    summary["images_per_s"] = {reference.name: round(reference.images_per_s, 4),
                               **{name: round(value, 4) for name, value in speed.items()}}
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=list_presets(), default="default",
                        help="an architecture preset (adaptive_tokenizer.presets): alit_small (the authors' size) or "
                             "default (the embedded default model's architecture)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (best is kept)")
    parser.add_argument("--target-tokens", type=int, default=128, help="mean adaptive length to calibrate for")
    parser.add_argument("--budgets", default="32,64,128,256")
    parser.add_argument("--rules", action="store_true",
                        help="time the length rules (exact, search, verified, predicted) on a trained model "
                             "(--model, default "
                             "the embedded one) and the photos of --images, instead of the architecture benchmark")
    parser.add_argument("--model", default=None, help="with --rules: the model (default: the embedded default)")
    parser.add_argument("--images", default="evaluation/photos",
                        help="with --rules: a folder of photos, all timed, in batches of --batch")
    parser.add_argument("--limit", type=int, default=None, help="with --rules: only the first N photos of --images")
    parser.add_argument("--no-per-image-check", action="store_true",
                        help="derive the per-image reference choice from the batch run instead of re-running")
