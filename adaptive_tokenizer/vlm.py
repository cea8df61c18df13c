"""Variable-length image tokens in Hugging Face ``transformers``: a processor, packed batches, images generated back.

    pip install "adaptive-tokenizer[vlm]"       # transformers >= 5

>>> processor = AdaptiveTokenizerProcessor.add_image_tokens(text_tokenizer, AdaptiveTokenizer.from_pretrained())
>>> model.resize_token_embeddings(len(processor.tokenizer))
>>> batch = processor(text=["A photo: <image>"], images=["cat.jpg"], max_tokens=256, halt_threshold=0.06,
...                   return_tensors="pt")
>>> packed, layout = pack_rows(list_of_id_rows, capacity=512)
>>> logits = model(**packed).logits                       # the logits of every row run alone
>>> pixels = processor.decode_images(generated_ids)        # every complete <boi> ... <eoi> span, as images

**The id mapping.** :meth:`AdaptiveTokenizerProcessor.add_image_tokens` adds to the text tokenizer, as special
tokens and in this order: ``<boi>``, ``<eoi>``, the placeholder ``<image>``, and one token per codebook entry,
``<img_0>`` ... ``<img_{K-1}>``. They receive consecutive ids, so image code ``c`` is text id
``image_id_offset + c`` (``image_id_offset`` = the id of ``<img_0>``), and back.

**The processor** (:class:`AdaptiveTokenizerProcessor`) turns text with ``<image>`` placeholders and images (or
tokens already made: an :class:`~adaptive_tokenizer.tokenizer.EncodeResult`, ``TokenDataset`` rows or id tensors)
into ``input_ids`` / ``attention_mask``: every placeholder becomes ``<boi> ids <eoi>`` of that image's own length.
It follows ``ProcessorMixin``'s conventions (``__call__`` returning a ``BatchFeature``, ``tokenizer``,
``batch_decode`` / ``decode``, ``save_pretrained`` / ``from_pretrained`` with a ``processor_config.json``) but does
not subclass it: its image side is a torch model with its own weights, not an image processor, so
``AutoProcessor`` does not load it; :meth:`AdaptiveTokenizerProcessor.from_pretrained` does.

**Packed batches** (:func:`pack_rows`): rows of different lengths packed into rows of ``capacity`` tokens with a
block-diagonal causal 4-D mask and ``position_ids`` restarting at every row, so a causal LM computes, for every
packed row, exactly the logits it computes for that row alone (tested on ``LlamaForCausalLM`` under ``sdpa`` and
``eager``). :func:`length_grouped_sampler` batches rows of similar length for plain padded batches.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import InputError, MissingExtraError
from .io_utils import write_atomic
from .serialization import model_identity
from .tokenizer import AdaptiveTokenizer, EncodeResult, resolve_max_tokens

try:
    from transformers import AutoTokenizer, BatchFeature, LogitsProcessor
    from transformers.trainer_pt_utils import LengthGroupedSampler
except ImportError:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError("adaptive_tokenizer.vlm needs transformers: "
                            "pip install 'adaptive-tokenizer[vlm]'") from None

BOI, EOI, IMAGE_PLACEHOLDER = "<boi>", "<eoi>", "<image>"
IMAGE_TOKEN = "<img_{}>"
PROCESSOR_CONFIG = "processor_config.json"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
ENCODE_OPTIONS = ("max_tokens", "halt_threshold", "length_rule")


class AdaptiveTokenizerProcessor:
    """An :class:`~adaptive_tokenizer.AdaptiveTokenizer` paired with a ``transformers`` text tokenizer that knows
    its image tokens (see the module docstring for the id mapping).

    ``encode_defaults``: ``max_tokens`` / ``halt_threshold`` / ``length_rule`` used when a call gives none (saved
    with the processor).
    """

    def __init__(self, image_tokenizer: AdaptiveTokenizer, tokenizer: Any, *,
                 encode_defaults: dict[str, Any] | None = None):
        if not image_tokenizer.config.quantized:
            raise InputError("the processor needs an image tokenizer with quantized (discrete) tokens; this model's "
                             "latents are continuous")
        self.image_tokenizer, self.tokenizer = image_tokenizer, tokenizer
        self.encode_defaults = _check_encode_options(dict(encode_defaults or {}))
        self.num_image_codes = image_tokenizer.config.codebook_size
        ids = tokenizer.convert_tokens_to_ids([BOI, EOI, IMAGE_PLACEHOLDER, IMAGE_TOKEN.format(0)])
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids or None in ids:
            raise InputError(f"the text tokenizer has no image tokens ({BOI}, {EOI}, {IMAGE_PLACEHOLDER}, "
                             f"{IMAGE_TOKEN.format(0)}...): build the processor with "
                             "AdaptiveTokenizerProcessor.add_image_tokens(text_tokenizer, image_tokenizer)")
        self.boi_id, self.eoi_id, self.placeholder_id, self.image_id_offset = ids
        last = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN.format(self.num_image_codes - 1))
        if last != self.image_id_offset + self.num_image_codes - 1:
            raise InputError(f"the text tokenizer's image tokens are not {self.num_image_codes} consecutive ids "
                             f"starting at {self.image_id_offset}: add them with add_image_tokens")

    # ---- building ------------------------------------------------------------------------------------------
    @classmethod
    def add_image_tokens(cls, text_tokenizer: Any, image_tokenizer: AdaptiveTokenizer,
                         **kwargs: Any) -> AdaptiveTokenizerProcessor:
        """Add ``<boi>``, ``<eoi>``, ``<image>`` and one token per codebook entry to ``text_tokenizer`` (in place;
        they get consecutive ids at the end of its vocabulary) and return the processor. Then resize the model's
        embeddings: ``model.resize_token_embeddings(len(text_tokenizer))``."""
        codes = range(image_tokenizer.config.codebook_size)
        new = [BOI, EOI, IMAGE_PLACEHOLDER] + [IMAGE_TOKEN.format(c) for c in codes]
        present = [t for t in new if t in text_tokenizer.get_vocab()]
        if present:
            raise InputError(f"the text tokenizer already has image tokens ({present[0]}, ...): load its processor "
                             "with AdaptiveTokenizerProcessor(image_tokenizer, text_tokenizer) instead")
        text_tokenizer.add_tokens(new, special_tokens=True)
        return cls(image_tokenizer, text_tokenizer, **kwargs)

    # ---- ids <-> image codes -------------------------------------------------------------------------------
    def image_ids_to_text_ids(self, codes: Tensor) -> Tensor:
        """Image code ids ``[0, K)`` -> text-tokenizer ids."""
        return codes.to(torch.long) + self.image_id_offset

    def text_ids_to_image_ids(self, ids: Tensor) -> Tensor:
        """Text-tokenizer ids of image tokens -> image code ids (ValueError for an id outside the image range)."""
        codes = ids.to(torch.long) - self.image_id_offset
        if len(codes) and (codes.min() < 0 or codes.max() >= self.num_image_codes):
            raise InputError(f"ids outside the image range [{self.image_id_offset}, "
                             f"{self.image_id_offset + self.num_image_codes})")
        return codes

    # ---- text + images -> ids -----------------------------------------------------------------------------
    def __call__(self, text: str | Sequence[str] | None = None, images: Any = None, *,
                 image_tokens: EncodeResult | Sequence[Any] | None = None, budget: int | None = None,
                 max_tokens: int | None = None, halt_threshold: float | None = None, length_rule: str | None = None,
                 return_tensors: str | None = None, padding: bool | str = True,
                 add_special_tokens: bool = True) -> BatchFeature:
        """``input_ids``, ``attention_mask`` (padded on the text tokenizer's ``padding_side``) and
        ``image_num_tokens`` (each image's token count, in placeholder order) of ``text`` with every ``<image>``
        replaced by ``<boi> ids <eoi>`` of the next image. ``text`` None: one row per image (``<image>`` alone).
        ``images``: anything ``AdaptiveTokenizer.encode`` takes, encoded with ``budget`` / ``max_tokens`` /
        ``halt_threshold`` / ``length_rule`` (default: ``encode_defaults``); or ``image_tokens``, tokens already
        made. ``padding``: as the text tokenizer's ``pad`` (False leaves rows unpadded)."""
        codes = self._image_codes(images, image_tokens, budget, max_tokens, halt_threshold, length_rule)
        texts = [IMAGE_PLACEHOLDER] * len(codes) if text is None else [text] if isinstance(text, str) else list(text)
        rows = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        counts = [row.count(self.placeholder_id) for row in rows]
        if sum(counts) != len(codes):
            per_row = ", ".join(f"row {i}: {n}" for i, n in enumerate(counts))
            raise InputError(f"the text has {sum(counts)} {IMAGE_PLACEHOLDER} placeholders ({per_row}) but "
                             f"{len(codes)} images were given: one image per placeholder, in order")
        spans = iter([self.boi_id, *self.image_ids_to_text_ids(c).tolist(), self.eoi_id] for c in codes)
        expanded = [[i for token in row for i in (next(spans) if token == self.placeholder_id else [token])]
                    for row in rows]
        batch = self.tokenizer.pad({"input_ids": expanded}, padding=padding, return_tensors=return_tensors)
        data = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "image_num_tokens": [len(c) for c in codes]}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _image_codes(self, images: Any, image_tokens: Any, budget: int | None, max_tokens: int | None,
                     halt_threshold: float | None, length_rule: str | None) -> list[Tensor]:
        """The image code ids of every image, in order (encoded, or checked when already tokens)."""
        if images is not None and image_tokens is not None:
            raise InputError("give images or image_tokens, not both")
        if image_tokens is not None:
            if isinstance(image_tokens, EncodeResult):
                image_tokens = image_tokens.tokens
            sequences = [row["tokens"] if isinstance(row, dict) else row for row in image_tokens]
            return self.image_tokenizer.check_tokens(sequences) if sequences else []
        if images is None:
            return []
        given = {"max_tokens": resolve_max_tokens(max_tokens, budget), "halt_threshold": halt_threshold,
                 "length_rule": length_rule}
        options = {**self.encode_defaults, **{k: v for k, v in given.items() if v is not None}}
        return list(self.image_tokenizer.encode(images, **options).tokens)

    # ---- ids -> text and images ---------------------------------------------------------------------------
    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """The text tokenizer's ``batch_decode`` (image tokens are special: ``skip_special_tokens=True`` drops them)."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """The text tokenizer's ``decode``."""
        return self.tokenizer.decode(*args, **kwargs)

    def image_spans(self, ids: Sequence[int] | Tensor, *, incomplete: str = "raise",
                    sequence: int = 0) -> list[tuple[int, Tensor]]:
        """The complete ``<boi> ... <eoi>`` spans of one sequence of ids: ``(position of <boi>, image code ids)``.

        ValueError naming the sequence and position for a span whose length this image tokenizer cannot decode,
        an id inside a span that is not an image token (another ``<boi>`` included), an ``<eoi>`` outside a span,
        and, with ``incomplete="raise"`` (default), a span cut off without ``<eoi>``; ``incomplete="drop"``
        leaves out such a last span (a generation stopped early), so the complete spans before it decode."""
        if incomplete not in ("raise", "drop"):
            raise InputError(f"incomplete must be 'raise' or 'drop', got {incomplete!r}")
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).tolist()
        config, spans, start = self.image_tokenizer.config, [], None
        low, high = self.image_id_offset, self.image_id_offset + self.num_image_codes
        where = f"sequence {sequence}"
        for position, token in enumerate(ids):
            if start is None:
                if token == self.boi_id:
                    start = position
                elif token == self.eoi_id:
                    raise InputError(f"{where}, position {position}: {EOI} without a {BOI} before it")
                continue
            if token == self.eoi_id:
                codes = torch.tensor(ids[start + 1 : position], dtype=torch.long) - low
                per = config.tokens_per_iteration
                if not len(codes) or len(codes) % per or len(codes) > config.max_tokens:
                    raise InputError(f"{where}, position {start}: the image span has {len(codes)} image tokens; this "
                                     f"image tokenizer decodes {per} to {config.max_tokens} in multiples of {per}")
                spans.append((start, codes))
                start = None
            elif not low <= token < high:
                raise InputError(f"{where}, position {position}: id {token} inside the image span opened at "
                                 f"position {start} is not an image token (image ids are [{low}, {high}))")
        if start is not None and incomplete == "raise":
            raise InputError(f"{where}, position {start}: the image span has no {EOI} (cut off?); pass "
                             "incomplete='drop' to decode only the complete spans")
        return spans

    def decode_images(self, ids: Sequence[int] | Tensor, *, incomplete: str = "raise") -> Tensor | list[Tensor]:
        """Every complete image span of ``ids`` as pixels through the image tokenizer (``tok.decode`` of the same
        codes): for one sequence ``[L]`` a tensor ``[n_spans, 3, R, R]``, for a batch ``[B, L]`` (or a list of
        sequences) a list of them. Errors and ``incomplete``: :meth:`image_spans`."""
        batch = ids.dim() == 2 if isinstance(ids, Tensor) else len(ids) > 0 and _is_list(ids[0])
        sequences = list(ids) if batch else [ids]
        spans = [self.image_spans(seq, incomplete=incomplete, sequence=i) for i, seq in enumerate(sequences)]
        codes = [c for per_sequence in spans for _, c in per_sequence]
        size = self.image_tokenizer.config.image_size
        pixels = self.image_tokenizer.decode(codes) if codes else torch.empty(0, 3, size, size)
        out = list(pixels.split([len(s) for s in spans]))
        return out if batch else out[0]

    # ---- saving / loading ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, *, include_image_tokenizer: bool | None = None) -> None:
        """Write the text tokenizer's files and ``processor_config.json`` (the image tokenizer's name and weights
        sha256, the encode defaults) into ``directory``; with ``include_image_tokenizer`` (default: when the image
        tokenizer has no name to load it by) also the image tokenizer itself, in ``image_tokenizer/``. Files are
        written to a temporary folder first, then moved in."""
        directory = Path(directory)
        tok = self.image_tokenizer
        include = tok.name_or_path is None if include_image_tokenizer is None else include_image_tokenizer
        identity, _ = model_identity(tok.model)
        config = {"processor_class": type(self).__name__,
                  "image_tokenizer": {"name_or_path": None if include else tok.name_or_path,
                                      "weights_sha256": identity["weights_sha256"],
                                      "saved": IMAGE_TOKENIZER_DIR if include else None},
                  "image_tokens": {"boi": BOI, "eoi": EOI, "placeholder": IMAGE_PLACEHOLDER,
                                   "image_token": IMAGE_TOKEN, "num_image_codes": self.num_image_codes,
                                   "image_id_offset": self.image_id_offset},
                  "encode_defaults": self.encode_defaults}
        directory.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.") as tmp:
            self.tokenizer.save_pretrained(tmp)
            if include:
                tok.save_pretrained(Path(tmp) / IMAGE_TOKENIZER_DIR)
            write_atomic(Path(tmp) / PROCESSOR_CONFIG, (json.dumps(config, indent=1) + "\n").encode())
            directory.mkdir(exist_ok=True)
            for item in sorted(Path(tmp).iterdir()):
                target = directory / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(item, target)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, image_tokenizer: AdaptiveTokenizer | None = None,
                        **image_tokenizer_kwargs: Any) -> AdaptiveTokenizerProcessor:
        """A processor saved by :meth:`save_pretrained`. The image tokenizer: ``image_tokenizer`` if given, else the
        one saved with it, else loaded by its recorded name (``image_tokenizer_kwargs`` go to
        ``AdaptiveTokenizer.from_pretrained``: ``device``, ``dtype``, ...); its weights must have the recorded
        sha256 (ValueError otherwise)."""
        directory = Path(directory)
        path = directory / PROCESSOR_CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no {PROCESSOR_CONFIG}: not a folder written by "
                                    "AdaptiveTokenizerProcessor.save_pretrained")
        config = json.loads(path.read_text())
        recorded = config["image_tokenizer"]
        if image_tokenizer is None:
            source = directory / recorded["saved"] if recorded.get("saved") else recorded["name_or_path"]
            image_tokenizer = AdaptiveTokenizer.from_pretrained(source, **image_tokenizer_kwargs)
        sha256 = model_identity(image_tokenizer.model)[0]["weights_sha256"]
        if sha256 != recorded["weights_sha256"]:
            raise InputError(f"the image tokenizer's weights (sha256 {sha256[:12]}...) are not the ones this "
                             f"processor was saved with ({recorded['weights_sha256'][:12]}...): its image ids would "
                             "mean other pictures")
        return cls(image_tokenizer, AutoTokenizer.from_pretrained(directory),
                   encode_defaults=config.get("encode_defaults"))


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, Tensor, np.ndarray))


def _check_encode_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(ENCODE_OPTIONS))
    if unknown:
        raise InputError(f"unknown encode defaults {unknown}; the processor takes {list(ENCODE_OPTIONS)}")
    return {k: v for k, v in options.items() if v is not None}


# ---- generation ----------------------------------------------------------------------------------------------
class ImageSpanLogitsProcessor(LogitsProcessor):
    """For ``model.generate(..., logits_processor=[...])``: inside an open ``<boi>`` span only image tokens may
    follow, and ``<eoi>`` only at a length the image tokenizer decodes (and then must, at its longest length);
    outside a span image tokens and ``<eoi>`` are not allowed. So every span generated decodes."""

    def __init__(self, processor: AdaptiveTokenizerProcessor):
        config = processor.image_tokenizer.config
        self.processor, self.per, self.longest = processor, config.tokens_per_iteration, config.max_tokens

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        p = self.processor
        image = slice(p.image_id_offset, p.image_id_offset + p.num_image_codes)
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        for row, ids in enumerate(input_ids.tolist()):
            opened = max((i for i, t in enumerate(ids) if t == p.boi_id), default=-1)
            closed = max((i for i, t in enumerate(ids) if t == p.eoi_id), default=-1)
            if opened > closed:  # inside a span: image tokens, and <eoi> at a valid length
                length = len(ids) - opened - 1
                if length < self.longest:
                    allowed[row, image] = True
                if length and length % self.per == 0:
                    allowed[row, p.eoi_id] = True
            else:
                allowed[row] = True
                allowed[row, image] = False
                allowed[row, p.eoi_id] = False
        return scores.masked_fill(~allowed, float("-inf"))


# ---- packed and length-grouped batches -------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedLayout:
    """Where :func:`pack_rows` put each input row: packed ``row``, ``start`` position and ``length``, ``[N]`` each
    (in the order of the input rows)."""

    row: Tensor
    start: Tensor
    length: Tensor

    def unpack(self, packed: Tensor) -> list[Tensor]:
        """Per input row, its slice of a packed ``[R, C, ...]`` tensor (logits, hidden states)."""
        return [packed[r, s : s + n] for r, s, n in zip(self.row.tolist(), self.start.tolist(),
                                                          self.length.tolist())]


def pack_rows(rows: Sequence[Tensor], capacity: int, *, pad_id: int = 0,
              dtype: torch.dtype = torch.float32) -> tuple[dict[str, Tensor], PackedLayout]:
    """Pack 1-D id tensors of different lengths into rows of ``capacity`` tokens, for a causal LM's forward
    (``model(**batch)``): ``input_ids`` ``[R, C]`` (``pad_id`` after the last sequence of a row), ``position_ids``
    restarting at 0 for every sequence, ``attention_mask`` ``[R, 1, C, C]`` additive (``dtype``: 0 where a position
    may attend, -inf elsewhere): causal within each sequence, nothing across sequences, padding attending to itself
    only; ``labels`` = the ids with -100 on padding and on each sequence's first token (which would be predicted
    from the previous sequence). Greedy first-fit by decreasing length, so sequences may move across rows to fill
    them; within a row they keep their input order. Returns the batch and the :class:`PackedLayout`."""
    if capacity < 1:
        raise InputError(f"capacity must be a positive number of tokens, got {capacity}")
    lengths = [len(r) for r in rows]
    for index, (row, length) in enumerate(zip(rows, lengths)):
        if row.dim() != 1 or row.is_floating_point():
            raise InputError(f"row {index}: expected a 1-D tensor of ids, got shape {tuple(row.shape)} {row.dtype}")
        if length > capacity:
            raise InputError(f"row {index} has {length} tokens, more than capacity {capacity}: raise the capacity "
                             "or cut the row")
        if length == 0:
            raise InputError(f"row {index} is empty")
    bins: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(rows)), key=lambda i: -lengths[i]):  # sorted() is stable: input order on ties
        target = next((b for b, room in enumerate(free) if room >= lengths[index]), None)
        if target is None:
            bins.append([])
            free.append(capacity)
            target = len(bins) - 1
        bins[target].append(index)
        free[target] -= lengths[index]
    input_ids = torch.full((len(bins), capacity), pad_id, dtype=torch.long)
    position_ids = torch.zeros(len(bins), capacity, dtype=torch.long)
    labels = torch.full((len(bins), capacity), -100, dtype=torch.long)
    mask = torch.full((len(bins), 1, capacity, capacity), float("-inf"), dtype=dtype)
    causal = torch.ones(capacity, capacity, dtype=torch.bool).tril()
    row_of, start_of = torch.zeros(len(rows), dtype=torch.long), torch.zeros(len(rows), dtype=torch.long)
    for b, members in enumerate(bins):
        position = 0
        for index in sorted(members):
            n, end = lengths[index], position + lengths[index]
            input_ids[b, position:end] = rows[index]
            position_ids[b, position:end] = torch.arange(n)
            labels[b, position + 1 : end] = rows[index][1:]
            mask[b, 0, position:end, position:end].masked_fill_(causal[:n, :n], 0.0)
            row_of[index], start_of[index] = b, position
            position = end
        padding = torch.arange(position, capacity)
        mask[b, 0, padding, padding] = 0.0  # padding attends to itself: no row without a key (no NaN)
    batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}
    return batch, PackedLayout(row_of, start_of, torch.tensor(lengths, dtype=torch.long))


def length_grouped_sampler(lengths: Sequence[int] | Tensor, batch_size: int, *,
                           generator: torch.Generator | None = None) -> LengthGroupedSampler:
    """``transformers``' ``LengthGroupedSampler`` (the ``group_by_length`` of its ``Trainer``) over rows of
    ``lengths``: shuffled, then sorted by length within groups of 50 batches, so each batch holds rows of similar
    length and pads little. Use it as a ``DataLoader``'s ``sampler`` with ``batch_size``; for a ``TokenDataset``,
    ``lengths=dataset.num_tokens()``."""
    return LengthGroupedSampler(batch_size, lengths=[int(n) for n in lengths], generator=generator)


