"""The compact text summary ``adaptive-tokenizer evaluate`` prints, from a report (typed, or as read from JSON)."""

from __future__ import annotations

import math

from .report import EvaluationReport, LengthRules


def fmt_threshold(value: float) -> str:
    """The shortest decimal that reads back as ``value`` (auto thresholds are chosen to be short)."""
    return repr(float(value))


def fmt_correlation(value: float | None) -> str:
    """``+0.123``, or ``n/a`` for a correlation that is undefined (None or NaN)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.3f}"


def format_table(report: EvaluationReport | dict) -> str:
    """The compact stdout summary of a report (an :class:`EvaluationReport`, or its ``to_dict()`` / JSON form)."""
    if isinstance(report, dict):
        report = EvaluationReport.from_dict(report)
    lines = [f"{report.metadata.num_images} images from {report.metadata.folder}",
             f"{'budget':>8}  {'L1':>7}  {'PSNR':>6}  {'SSIM':>6}"]
    for row in report.fixed:
        lines.append(f"{row.budget:>8}  {row.l1:7.4f}  {row.psnr:6.2f}  {row.ssim:6.4f}")
    ceiling = report.base_ceiling
    lines.append(f"{'VQGAN':>8}  {ceiling.l1:7.4f}  {ceiling.psnr:6.2f}  {ceiling.ssim:6.4f}  "
                 f"(base ceiling, {ceiling.grid_tokens} codes)")
    adaptive, comp = report.adaptive, report.adaptive.comparison
    lines.append(f"adaptive ({adaptive.thresholds_source} thresholds):")
    lines.append(f"{'threshold':>11}  {'tokens':>7}  {'L1':>7}  lengths " + "/".join(str(b) for b in report.budgets))
    for index, level in enumerate(adaptive.levels):
        mark = f"  <- closest to {comp.target_tokens}" if index == adaptive.target_level else ""
        lines.append(f"{fmt_threshold(level.threshold):>11}  {level.mean_tokens:7.1f}  {level.mean_l1:7.4f}  "
                     + "/".join(str(c) for c in level.histogram) + mark)
    lines.append(f"adaptive t={fmt_threshold(comp.threshold)}: L1 {comp.adaptive_mean_l1:.4f} at "
                 f"{comp.adaptive_mean_tokens:.1f} tokens on average; fixed {comp.fixed_budget}: "
                 f"L1 {comp.fixed_mean_l1:.4f}")
    pair = comp.per_image
    lines.append(f"  per image: better {pair.better}, worse {pair.worse}, same {pair.same}; mean difference "
                 f"{pair.mean:+.4f}, bootstrap 95% [{pair.bootstrap_95[0]:+.4f}, {pair.bootstrap_95[1]:+.4f}]")
    best = comp.best_allocation
    lines.append(f"best allocation knowing every image's errors (no rule can do better): L1 {best.mean_l1:.4f} at "
                 f"{best.mean_tokens:.1f} tokens on average, Spearman(length, complexity) "
                 f"{fmt_correlation(best.spearman_length_vs_complexity)}")
    cx = report.complexity
    lines.append(f"Spearman vs JPEG complexity: chosen length {fmt_correlation(cx.spearman_length_vs_complexity)}, "
                 f"L1 at {cx.fixed_budget} tokens {fmt_correlation(cx.spearman_l1_at_fixed_budget_vs_complexity)}")
    return "\n".join(lines + fidelity_lines(report) + format_rules(report.length_rules))


def format_rules(rules: LengthRules) -> list[str]:
    """The length rules' block of the printed summary."""
    lines = [f"length rules at the target whose mean length is closest to {rules.target_tokens} tokens:",
             f"{'rule':>10}  {'target E':>9}  {'tokens':>7}  {'L1':>7}  {'reach E':>7}  {'fixed for same':>14}  "
             f"{'Spearman':>8}  {'decodes':>7}"]
    for name, row in (("exact", rules.exact), ("search", rules.search), ("verified", rules.verified),
                      ("predicted", rules.predicted)):
        if row is None:
            continue
        fixed = row.fixed_budget_for_same_share
        decodes = getattr(row, "decodes_per_image", 0.0)  # the predicted rule decodes nothing to choose
        lines.append(f"{name:>10}  {fmt_threshold(row.threshold):>9}  {row.mean_tokens:7.1f}  "
                     f"{row.mean_l1:7.4f}  {row.share_meeting_target:7.1%}  "
                     f"{fixed if fixed is not None else 'none':>14}  "
                     f"{fmt_correlation(row.spearman_length_vs_complexity):>8}  {decodes:7.2f}")
    lines.append(f"  search: same length as exact for {rules.search.same_length_as_exact:.1%} of images")
    if (v := rules.verified) is not None:
        at = v.at_exact_threshold
        lines.append(f"  verified: fixed {v.fixed_budget} reaches its E for {v.fixed_share_meeting_target:.1%}; at the "
                     f"exact rule's E: {at.share_meeting_target:.1%} reach it with {at.mean_tokens:.1f} tokens, "
                     f"{at.decodes_per_image:.2f} decodes, same length as exact {at.same_length_as_exact:.1%}")
    if (p := rules.predicted) is not None:
        lines.append(f"  predicted: within one iteration of exact {p.within_one_of_exact:.1%}, same "
                     f"{p.same_length_as_exact:.1%}; fixed {p.fixed_budget} reaches its E for "
                     f"{p.fixed_share_meeting_target:.1%}; predictor MAE {p.predictor_mean_absolute_error:.4f}")
    return lines


def fidelity_lines(report: EvaluationReport) -> list[str]:
    """Sharpness and colour per budget (reports written before these measures have none: no lines)."""
    if report.base_ceiling.fidelity.sharpness is None:
        return []
    lines = [f"{'budget':>8}  {'sharpness':>9}  {'colour offset':>13}  grey chroma x255 "
             f"({report.base_ceiling.fidelity.greyscale_images} greyscale)"]
    for name, row in [*((str(row.budget), row) for row in report.fixed), ("VQGAN", report.base_ceiling)]:
        fidelity = row.fidelity
        chroma = "n/a" if fidelity.greyscale_chroma is None else f"{255 * fidelity.greyscale_chroma:.2f}"
        lines.append(f"{name:>8}  {fidelity.sharpness:9.3f}  {fidelity.colour_offset:13.4f}  {chroma:>6}")
    return lines
