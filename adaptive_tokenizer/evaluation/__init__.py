"""Evaluation on a folder of images: reconstruction quality per token budget, adaptive length, image complexity.

``adaptive-tokenizer evaluate FOLDER --model MODEL -o OUT_DIR`` (or :func:`evaluate_folder`) writes
``OUT_DIR/report.json`` and four PNG figures (``grid.png``, ``l1_vs_tokens.png``, ``lengths_histogram.png``,
``length_vs_complexity.png``; the last three need matplotlib: ``pip install "adaptive-tokenizer[eval]"``) and
prints a compact table. The modules:

- :mod:`.measure`: one pass over the images, every metric at every budget (the metrics themselves:
  :mod:`adaptive_tokenizer.metrics`), the base tokenizer's ceiling, complexity;
- :mod:`.lengths`: the adaptive thresholds and lengths, the comparison with a fixed budget and the best allocation,
  length vs complexity (the rules replayed on the error table: :mod:`adaptive_tokenizer.length_report`);
- :mod:`.report`: the report as typed dataclasses, ``report.json`` written from them and read back;
- :mod:`.figures`: the grid (PIL) and the plots (matplotlib); :mod:`.table`: the printed summary;
- :mod:`.run`: :func:`evaluate_folder`, the above in order.

What is measured (every image preprocessed as the model sees it: resized, centre-cropped to its resolution):

* **Fixed budgets** 32, 64, ..., max: mean L1, PSNR and SSIM of the reconstruction *clamped to [0, 1]* against the
  preprocessed input, from one rollout per image (``AdaptiveTokenizer.reconstructions``). ``error_unclamped`` is
  the mean of the errors ``reconstructions`` returns (L1 before clamping), what ``halt_threshold`` is a target for.
* **Base ceiling**: the VQGAN's own reconstruction (:func:`adaptive_tokenizer.model.base_reconstruction`: encode
  -> nearest codes -> ``decode_ids``), same metrics.
* **Sharpness and colour** (:mod:`adaptive_tokenizer.metrics`), per budget and for the ceiling: ``sharpness``, the
  mean grey gradient magnitude (Rec. 601 luma, forward differences) of the clamped reconstructions over the
  inputs' (a ratio of means over the images; 1 = as sharp as the input); ``colour_offset``, the mean over images
  and channels of |channel mean of the reconstruction - of the input|; ``greyscale_chroma``, over the greyscale
  inputs only (no pixel's channels more than 2/255 from their mean), the mean |channel - mean of the channels| of
  the reconstruction (``null`` without greyscale inputs).
* **Adaptive length** at several thresholds (:mod:`.lengths`): each image's length is the first budget whose error
  is ``<=`` the threshold, else the budget with the lowest error (first on ties): exactly the exact rule of
  ``encode(halt_threshold=...)``. Reported: mean tokens, mean L1 of the chosen (clamped) reconstruction, a histogram
  of lengths. The threshold whose mean length is closest to ``target_tokens`` (128) is compared with a fixed budget
  of 128 for every image and with the **best allocation** (:func:`best_allocation`): the lengths, at most
  ``target_tokens`` on average, that minimise the mean L1 knowing every image's errors, the bound on what any
  halting rule could reach on these images. ``per_image`` (:func:`paired_difference`): images better / worse / the
  same than at the fixed budget, and a seeded bootstrap 95% interval of the mean difference.
* **Complexity**: JPEG bytes per pixel of the model-resolution input (PIL, quality 90, default 4:2:0 chroma
  subsampling, in memory); Spearman correlations of complexity with the chosen length (at the ~128 threshold) and
  with the L1 error at each fixed budget.
* **Length rules** (``length_rules`` in the report, :mod:`~adaptive_tokenizer.length_report`): the exact, search
  and predicted rules (the last with a model that has a length predictor, whose estimates are made for every
  image) at the target whose mean length is closest to ``target_tokens``: mean tokens and L1, the share of images
  reaching the target, the smallest fixed budget reaching the same share, Spearman with complexity, decodes per
  image, and for the predicted rule its agreement with the exact rule and its mean absolute error.

Metric conventions (:mod:`adaptive_tokenizer.metrics`): pixels in [0, 1]. PSNR = ``10 log10(1 / MSE)`` per image,
then averaged over images, **capped at** :data:`~adaptive_tokenizer.metrics.PSNR_CAP_DB` (100 dB), which keeps
``report.json`` valid JSON. SSIM is Wang et al. (2004): Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, data
range 1, "valid" filtering, the SSIM map averaged per channel, then over the three RGB channels (no downsampling),
filtered in float32. ``metadata.elapsed_s`` is the evaluation's wall time (model loading excluded).
"""

from .figures import FiguresSkippedWarning, write_figures
from .lengths import TARGET_TOKENS, auto_thresholds, best_allocation, paired_difference, parse_thresholds
from .measure import JPEG_QUALITY, base_pixels, jpeg_complexity
from .report import FIGURES, REPORT_FORMAT, EvaluationReport, read_report, write_report
from .run import evaluate_folder
from .table import format_table

__all__ = ["FIGURES", "JPEG_QUALITY", "REPORT_FORMAT", "TARGET_TOKENS", "EvaluationReport", "FiguresSkippedWarning",
           "auto_thresholds", "base_pixels", "best_allocation", "evaluate_folder", "format_table", "jpeg_complexity",
           "paired_difference", "parse_thresholds", "read_report", "write_figures", "write_report"]
