"""Public API: ``AdaptiveTokenizer.from_pretrained(...)``, ``.encode(...)``, ``.decode(...)``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .errors import InputError, InputTypeError
from .hub import CARD_NAME, Manifest, ModelInfo, push_folder, render_model_card, resolve
from .image_io import ImageInput, iter_image_batches
from .io_utils import release_free_heap, write_atomic
from .model import ALITModel
from .length_rules import (LengthRule, choose_length, predict_errors, require_predictor,
                           resolve_length_rule)
from .rollout import IterationRecord, reconstruct, rollout
from .serialization import load_model_files, save_model_files

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

# dtype names accepted wherever a dtype is given by name (from_pretrained, --dtype, the benchmark)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class EncodeResult:
    """Tokens of a batch of images; lengths may differ between images.

    ``tokens[i]``: ``[L_i]`` int64 code ids (quantized models) or ``[L_i, D]`` float32 vectors (continuous).
    ``num_tokens``: ``[N]`` int64, ``L_i``. ``errors``: ``[N]`` float32 *measured* mean absolute pixel error of
    the chosen length (``halt_threshold`` with the ``"exact"`` or ``"search"`` rule; else None).
    ``predicted_errors``: ``[N]`` float32 the length predictor's *estimate* of that error (``"verified"`` and
    ``"predicted"`` rules; else None). ``length_rule``: the rule that chose the lengths (None for a fixed budget):
    what ran, so a default that fell back to ``"exact"`` (a model without a length predictor) says so.
    See :meth:`AdaptiveTokenizer.encode`.
    """

    tokens: list[Tensor]
    num_tokens: Tensor
    errors: Tensor | None = None
    predicted_errors: Tensor | None = None
    length_rule: str | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def concat(cls, parts: Sequence[EncodeResult]) -> EncodeResult:
        """One result from the results of consecutive batches (:meth:`AdaptiveTokenizer.encode_iter`)."""
        if not parts:
            raise InputError("EncodeResult.concat needs at least one result")
        first = parts[0]
        return cls(tokens=[t for part in parts for t in part.tokens],
                   num_tokens=torch.cat([part.num_tokens for part in parts]),
                   errors=torch.cat([p.errors for p in parts]) if first.errors is not None else None,
                   predicted_errors=(torch.cat([p.predicted_errors for p in parts])
                                     if first.predicted_errors is not None else None),
                   length_rule=first.length_rule)

    def padded(self, pad_id: int | float) -> tuple[Tensor, Tensor]:
        """Right-pad to the longest sequence: ``(tokens [N, Lmax(, D)], attention_mask [N, Lmax] bool)``.

        ``attention_mask`` is True on real tokens and False on padding (filled with ``pad_id``).
        """
        longest = int(self.num_tokens.max())
        first = self.tokens[0]
        out = torch.full((len(self), longest, *first.shape[1:]), pad_id, dtype=first.dtype, device=first.device)
        mask = torch.zeros(len(self), longest, dtype=torch.bool, device=first.device)
        for row, seq in enumerate(self.tokens):
            out[row, : len(seq)] = seq
            mask[row, : len(seq)] = True
        return out, mask


class AdaptiveTokenizer:
    """Image <-> variable-length token sequences (ALIT).

    >>> tok = AdaptiveTokenizer.from_pretrained("org/name")             # or a manifest name, or a directory
    >>> result = tok.encode("photo.jpg", budget=64)            # 64 tokens
    >>> result = tok.encode(images, halt_threshold=0.025)       # per-image length
    >>> pixels = tok.decode(result)                              # [N, 3, H, W] in [0, 1]
    """

    def __init__(self, model: ALITModel, *, batch_size: int = 16, info: ModelInfo | None = None):
        self.model = model.eval().requires_grad_(False)
        self.config = model.config
        self.batch_size = batch_size
        self.info = info  # model card facts (description, licence, provenance); from the manifest when loaded by name
        # what from_pretrained loads this model from again (a manifest name, org/name[@revision] or a folder);
        # None for a model built in memory
        self.name_or_path: str | None = None

    # ---- loading / saving ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None = None, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None,
                        manifest: str | os.PathLike | Manifest | None = None) -> "AdaptiveTokenizer":
        """Load a model: the embedded default (no argument), a manifest name (``list_pretrained()``), a Hub repo id
        ``org/name[@revision]`` or a local directory holding ``config.json`` + ``model.safetensors``.

        ``revision``, ``cache_dir``, ``local_files_only``, ``token``: for Hub downloads (``huggingface_hub`` cache;
        ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` apply). Manifest files are checked against their sha256 before loading
        (:class:`~adaptive_tokenizer.hub.ChecksumError`); a model that cannot be found, or is not cached while
        offline, raises :class:`~adaptive_tokenizer.hub.ModelNotFoundError`. ``manifest``: another manifest file
        (default: the one shipped with the package). ``device``: default CPU. ``dtype``: float32 (default) or
        bfloat16 anywhere, float16 on CUDA only. Nothing is ever unpickled.
        """
        resolved = resolve(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                           token=token, manifest=manifest)
        config, weights = load_model_files(resolved.directory)
        if resolved.entry is not None:
            resolved.entry.check_config(config)
        model = ALITModel(config)
        model.load_state_dict(weights, strict=True, assign=True)
        info = resolved.entry.info if resolved.entry is not None else None
        tok = cls(model, info=info).to(device=device, dtype=dtype)
        if name_or_path is None:
            tok.name_or_path = resolved.entry.name if resolved.entry is not None else None
        else:
            tok.name_or_path = str(name_or_path) + (f"@{revision}" if revision else "")
        return tok

    def save_pretrained(self, directory: str | os.PathLike, *, info: ModelInfo | None = None) -> None:
        """Write ``config.json``, ``model.safetensors`` (float32) and a model card ``README.md`` to ``directory``.

        ``info``: the card's description, licence and provenance (default ``self.info``).
        """
        self._save(directory, info, load_as=None)

    def push_to_hub(self, repo_id: str, *, token: str | None = None, revision: str | None = None,
                    private: bool | None = None, commit_message: str = "Upload ALIT model",
                    info: ModelInfo | None = None) -> CommitInfo:
        """Publish this model to the Hub repo ``repo_id`` (created if needed; ``revision``: a branch, created if
        needed) as ``config.json``, ``model.safetensors`` and a model card. Returns the commit: pin ``.oid`` in a
        manifest entry to make the model loadable by name."""
        with tempfile.TemporaryDirectory() as tmp:
            self._save(tmp, info, load_as=repo_id)
            return push_folder(tmp, repo_id, token=token, revision=revision, private=private,
                               commit_message=commit_message)

    def _save(self, directory: str | os.PathLike, info: ModelInfo | None, load_as: str | None) -> None:
        weights = {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()}
        save_model_files(directory, self.config, weights)
        card = render_model_card(self.config, info or self.info, load_as=load_as)
        write_atomic(Path(directory) / CARD_NAME, card.encode())

    def to(self, device: str | torch.device | None = None,
           dtype: str | torch.dtype | None = None) -> "AdaptiveTokenizer":
        """Move the model to ``device`` and/or cast it to ``dtype``, in place; what is not given stays as it is (as
        ``torch.nn.Module.to``). A combination the device cannot run (float16 on the CPU) is refused."""
        target_device = _resolve_device(device) if device is not None else self.device
        target_dtype = _resolve_dtype(dtype if dtype is not None else self.dtype, target_device)
        self.model.to(device=target_device, dtype=target_dtype)
        return self

    def cpu(self) -> "AdaptiveTokenizer":
        return self.to(device="cpu")

    def cuda(self, index: int | None = None) -> "AdaptiveTokenizer":
        return self.to(device="cuda" if index is None else f"cuda:{index}")

    def float(self) -> "AdaptiveTokenizer":
        return self.to(dtype=torch.float32)

    def bfloat16(self) -> "AdaptiveTokenizer":
        return self.to(dtype=torch.bfloat16)

    def compile(self, **compile_kwargs) -> "AdaptiveTokenizer":
        """``torch.compile`` the hot modules in place (base encoder/decoder, encoder and decoder transformers).

        Shapes vary with the budget and batch, so ``dynamic=True`` is the default. Tokens equal eager mode's
        (tested); the first calls are slow while graphs compile.
        """
        compile_kwargs.setdefault("dynamic", True)
        model = self.model
        for module in (model.base.encoder, model.base.decoder, model.encoder.transformer, model.decoder):
            module.compile(**compile_kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.base.codebook.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.base.codebook.dtype

    @property
    def max_tokens(self) -> int:
        return self.config.max_tokens

    @property
    def tokens_per_iteration(self) -> int:
        return self.config.tokens_per_iteration

    # ---- encode --------------------------------------------------------------------------------------------
    def encode(self, images: ImageInput | Iterable[ImageInput], *, batch_size: int | None = None,
               max_tokens: int | None = None, budget: int | None = None, halt_threshold: float | None = None,
               length_rule: LengthRule | None = None) -> EncodeResult:
        """Encode images into token sequences.

        ``images``: one input or any iterable of them (a list, a generator of paths, ...), read batch by batch
        (:meth:`encode_iter`), so memory does not grow with their number. ``batch_size``: images per model call
        (default: the object's ``batch_size``).
        ``max_tokens`` (alias ``budget``): tokens per image, at most; rounded down to a multiple of
        ``tokens_per_iteration``; default the model's maximum. Only the iterations it needs are run. Without
        ``halt_threshold`` every image gets exactly ``max_tokens`` tokens.
        ``halt_threshold``: a target error. Each image gets a length whose reconstruction's mean absolute pixel
        error (pixels in [0, 1]) is ``<=`` it, else the length with the lowest error up to ``max_tokens``.
        ``length_rule``: how that length is found (``length_rules.py``; ``result.length_rule`` says which ran):
        ``"verified"`` (default for a model with a length predictor: decode the predicted length, step up while the
        target is missed; about 1.3 decodes per image), ``"exact"`` (default without a predictor: decode every
        length up to the answer; always the fewest tokens), ``"search"`` (the exact rule's lengths when an image's
        error crosses the target once, about half its decodes), ``"predicted"`` (the length predictor alone: no
        decoding, fixed-budget speed, the target not checked). ``"verified"`` and ``"predicted"`` need a model with
        a length predictor.
        """
        return EncodeResult.concat(list(self.encode_iter(images, batch_size=batch_size, max_tokens=max_tokens,
                                                         budget=budget, halt_threshold=halt_threshold,
                                                         length_rule=length_rule)))

    def encode_iter(self, images: ImageInput | Iterable[ImageInput], *, batch_size: int | None = None,
                    max_tokens: int | None = None, budget: int | None = None, halt_threshold: float | None = None,
                    length_rule: LengthRule | None = None) -> Iterator[EncodeResult]:
        """:meth:`encode`, one :class:`EncodeResult` per batch of ``batch_size`` inputs, in order: the inputs are read
        lazily (a background thread decodes the next batch while the model runs), so a job over any number of
        images holds two batches of them. The arguments are checked before any input is read."""
        num_iterations = self._iterations_for(max_tokens, budget)
        rule = resolve_length_rule(self.model, halt_threshold, length_rule)
        if halt_threshold is not None:
            halt_threshold = check_halt_threshold(halt_threshold)
        for pixels in iter_image_batches(images, self.config.image_size, self._batch_size(batch_size)):
            with torch.inference_mode():
                batch = pixels.to(self.device)
                if rule is None:
                    out = rollout(self.model, batch, num_iterations, halting_confidence=self._halting_confidence())
                else:
                    out = choose_length(self.model, batch, num_iterations, halt_threshold, rule,
                                        halting_confidence=self._halting_confidence())
            result = EncodeResult([t.cpu() for t in out.tokens], out.num_iterations * self.tokens_per_iteration,
                                  out.errors, out.predicted_errors, length_rule=rule)
            del pixels, batch, out
            release_free_heap()  # the batch's buffers are free: keep resident memory flat over long inputs
            yield result

    def predict_errors(self, images: ImageInput | Iterable[ImageInput], *, batch_size: int | None = None) -> Tensor:
        """The length predictor's estimate of each image's mean absolute pixel error at every length, ``[N, I]``
        float32 (lengths ``tokens_per_iteration * (1..max_iterations)``), from one encoder iteration. A prediction,
        not a measurement (:meth:`reconstructions` measures). ValueError for a model without a predictor."""
        require_predictor(self.model, "predict_errors")
        with torch.inference_mode():
            return torch.cat([predict_errors(self.model, pixels.to(self.device)).cpu() for pixels in
                              iter_image_batches(images, self.config.image_size, self._batch_size(batch_size))])

    def reconstructions(self, images: ImageInput | Iterable[ImageInput], max_tokens: int | None = None, *,
                        batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Reconstruction at every budget up to ``max_tokens``, from one rollout per image.

        Returns ``(pixels [N, I, 3, R, R] in [0, 1], errors [N, I])`` for ``I`` iterations (budgets
        ``tokens_per_iteration * (1..I)``); errors are mean absolute pixel errors of the unclamped output,
        the quantity ``halt_threshold`` is a target for.
        """
        num_iterations = self._iterations_for(max_tokens, None)
        all_pixels, all_errors = [], []
        for pixels in iter_image_batches(images, self.config.image_size, self._batch_size(batch_size)):
            records: list[IterationRecord] = []
            with torch.inference_mode():
                rollout(self.model, pixels.to(self.device), num_iterations,
                        halting_confidence=self._halting_confidence(), trace=records.append)
                all_pixels.append(torch.stack([r.reconstruction.clamp(0, 1).cpu() for r in records], dim=1))
                all_errors.append(torch.stack([r.error.cpu() for r in records], dim=1))
        return torch.cat(all_pixels), torch.cat(all_errors)

    def base_errors(self, images: ImageInput | Iterable[ImageInput], *, batch_size: int | None = None) -> Tensor:
        """``[N]`` float32 mean absolute pixel error of the base tokenizer's own (unclamped) reconstruction: the
        floor of every budget."""
        base, out = self.model.base, []
        for pixels in iter_image_batches(images, self.config.image_size, self._batch_size(batch_size)):
            with torch.inference_mode():
                batch = pixels.to(device=self.device, dtype=self.dtype)
                out.append(self.model.base_error(batch, base.code_ids(base.encode(batch))).cpu())
        return torch.cat(out)

    # ---- decode --------------------------------------------------------------------------------------------
    def decode(self, tokens: EncodeResult | Sequence[Tensor] | Tensor | np.ndarray, *,
               batch_size: int | None = None) -> Tensor:
        """Tokens -> images ``[N, 3, R, R]`` float32 in [0, 1] (on the model's device).

        Accepts an :class:`EncodeResult`, a list of per-image tensors (lengths may differ), or one tensor:
        ids ``[L]`` / ``[N, L]`` (quantized models), vectors ``[L, D]`` / ``[N, L, D]`` (continuous models).
        """
        sequences = self._token_sequences(tokens)
        output: list[Tensor | None] = [None] * len(sequences)
        by_length: dict[int, list[int]] = {}
        for index, seq in enumerate(sequences):
            by_length.setdefault(len(seq), []).append(index)
        batch_size = self._batch_size(batch_size)
        with torch.inference_mode():
            for length, indices in sorted(by_length.items()):
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start : start + batch_size]
                    batch = torch.stack([sequences[i] for i in chunk]).to(self.device)
                    logits = self.model.decoder(self.model.decoder_inputs(batch))
                    pixels = reconstruct(self.model, logits).clamp_(0, 1)
                    for row, index in enumerate(chunk):
                        output[index] = pixels[row]
        return torch.stack(output)  # type: ignore[arg-type]

    def check_tokens(self, tokens: EncodeResult | Sequence[Tensor] | Tensor | np.ndarray) -> list[Tensor]:
        """What :meth:`decode` checks, without decoding: the per-image sequences (int64 ids or float32 vectors, on
        the CPU), or decode's ValueError/TypeError naming the first bad sequence by its index in ``tokens``."""
        return self._token_sequences(tokens)

    # ---- helpers -------------------------------------------------------------------------------------------
    def _batch_size(self, batch_size: int | None) -> int:
        """A call's ``batch_size``, else the object's."""
        return self.batch_size if batch_size is None else batch_size

    def _halting_confidence(self) -> float | None:
        return self.config.dynamic_halting_confidence if self.config.dynamic_halting else None

    def _iterations_for(self, max_tokens: int | None, budget: int | None) -> int:
        requested = resolve_max_tokens(max_tokens, budget)
        if requested is None:
            return self.config.max_iterations
        if isinstance(requested, bool) or not isinstance(requested, (int, np.integer)):
            raise InputError(f"max_tokens/budget must be an int, got {requested!r}")
        per = self.tokens_per_iteration
        if not per <= requested <= self.max_tokens:
            raise InputError(f"max_tokens/budget must be between {per} and {self.max_tokens} tokens (a value between "
                             f"multiples of {per} is rounded down to one), got {requested}")
        return int(requested) // per

    def _token_sequences(self, tokens: EncodeResult | Sequence[Tensor] | Tensor | np.ndarray) -> list[Tensor]:
        quantized = self.config.quantized
        if isinstance(tokens, EncodeResult):
            tokens = tokens.tokens
        if isinstance(tokens, np.ndarray):
            tokens = torch.from_numpy(tokens)
        single_dims = 1 if quantized else 2
        if isinstance(tokens, Tensor):
            if tokens.dim() == single_dims:
                sequences = [tokens]
            elif tokens.dim() == single_dims + 1:
                sequences = list(tokens)
            else:
                raise InputError(f"token tensor must have {single_dims} or {single_dims + 1} dims "
                                 f"({self._token_form()}), got shape {tuple(tokens.shape)}")
        elif isinstance(tokens, (list, tuple)):
            sequences = [torch.from_numpy(t) if isinstance(t, np.ndarray) else t for t in tokens]
        else:
            raise InputTypeError(f"decode accepts an EncodeResult, a list of tensors or a tensor, got "
                                 f"{type(tokens).__name__}")
        if not sequences:
            raise InputError("decode got no token sequences")
        return [self._check_sequence(seq, index) for index, seq in enumerate(sequences)]

    def _token_form(self) -> str:
        if self.config.quantized:
            return f"int64 ids in [0, {self.config.codebook_size}), shape [L] or [N, L]"
        return f"float vectors of size {self.config.latent_dim}, shape [L, D] or [N, L, D]"

    def _check_sequence(self, seq: Tensor, index: int) -> Tensor:
        config, where = self.config, f"token sequence {index}"
        if not isinstance(seq, Tensor):
            raise InputTypeError(f"{where} is a {type(seq).__name__}, expected a tensor ({self._token_form()})")
        if config.quantized:
            if seq.dim() != 1 or seq.dtype == torch.bool or seq.is_floating_point() or seq.is_complex():
                raise InputError(f"{where}: expected a 1-D integer tensor ({self._token_form()}), got "
                                 f"shape {tuple(seq.shape)} dtype {seq.dtype}")
            seq = seq.to(torch.long)  # before comparing: codebook_size may not fit a small dtype (uint8, int8)
            if len(seq) and (seq.min() < 0 or seq.max() >= config.codebook_size):
                raise InputError(f"{where}: token ids must lie in [0, {config.codebook_size}), got range "
                                 f"[{int(seq.min())}, {int(seq.max())}]")
        else:
            if seq.dim() != 2 or not seq.is_floating_point() or seq.shape[1] != config.latent_dim:
                raise InputError(f"{where}: expected a float tensor [L, {config.latent_dim}], got shape "
                                 f"{tuple(seq.shape)} dtype {seq.dtype}")
            if not torch.isfinite(seq).all():
                raise InputError(f"{where}: token vectors contain NaN or infinity")
            seq = seq.to(torch.float32)
        per = config.tokens_per_iteration
        if len(seq) == 0 or len(seq) > config.max_tokens or len(seq) % per:
            raise InputError(f"{where}: has {len(seq)} tokens; this model decodes {per} to {config.max_tokens} "
                             f"tokens in multiples of {per}")
        return seq.cpu()


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` (default CPU) as a torch device this machine has; ValueError naming what is missing otherwise."""
    try:
        resolved = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError):
        raise InputError(f"invalid device {device!r} (e.g. 'cpu', 'cuda', 'cuda:1', 'mps')") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if resolved.type not in available or not available[resolved.type]:
        raise InputError(f"device {device!r} is not available here (this machine has: "
                         f"{', '.join(k for k, v in available.items() if v)})")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InputError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA devices")
    return resolved


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    allowed = (torch.float32, torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32, torch.bfloat16)
    if dtype not in allowed:
        raise InputError(f"dtype {dtype} is not supported on {device.type}; use one of {[str(d) for d in allowed]}")
    return dtype


def resolve_max_tokens(max_tokens: int | None, budget: int | None) -> int | None:
    """``max_tokens`` and its alias ``budget`` as one value (None: neither given); ValueError when both are given
    with different values. The one place the alias is resolved (``encode``, ``tokenize``'s settings)."""
    if max_tokens is not None and budget is not None and max_tokens != budget:
        raise InputError(f"budget is an alias of max_tokens; got both with different values ({budget} and "
                         f"{max_tokens})")
    return max_tokens if max_tokens is not None else budget


def check_halt_threshold(value: object) -> float:
    """``halt_threshold`` as a float: any real number type (Python, NumPy, a 0-d tensor) that is finite and >= 0."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()
    elif isinstance(value, np.generic) and np.issubdtype(value.dtype, np.number) \
            and not np.issubdtype(value.dtype, np.complexfloating):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise InputError(f"halt_threshold must be a non-negative number (a target mean absolute pixel error, pixels "
                         f"in [0, 1]), got {value!r}")
    return float(value)
