"""Tokenize a whole dataset into resumable Parquet shards, on this machine or (``engine="ray"``) a Ray cluster.

>>> summary = tokenize_dataset("photos/", "tokens/", encode_kwargs={"max_tokens": 256, "halt_threshold": 0.03})
>>> summary.exit_status   # 0: every input tokenized, 3: some skipped (listed in tokens/errors.jsonl)

The layout is described in :mod:`adaptive_tokenizer.token_shards`. Shard ``k`` always holds the same inputs (source
order, ``shard_size`` per shard), so a rerun after a crash writes only the missing shards and ends with the same
files; a rerun with other settings or another model into the same folder is refused. Inputs that cannot be read
are skipped and listed; they never stop the job.

The local engine decodes images in a pool of threads (``workers``) while the model encodes the previous batch.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from .errors import InputError, InputTypeError
from .dataset_source import DatasetSource, open_source
from .image_io import ImageInput, load_images
from .length_rules import resolve_length_rule
from .serialization import model_identity
from .token_shards import (FORMAT, Failure, ShardStats, check_same_job, finished_shards, read_index, read_stats,
                           remove_stale_temporaries, shard_table, write_errors, write_index, write_shard)
from .tokenizer import AdaptiveTokenizer, resolve_max_tokens

ENGINES = ("local", "ray")
DEFAULT_SHARD_SIZE = 10_000
EXIT_SKIPPED = 3  # the job completed but some inputs could not be read


@dataclass(frozen=True)
class TokenizeSummary:
    """Totals over the whole output folder (shards of earlier runs included) and this run's time."""

    output_dir: Path
    num_inputs: int
    num_tokenized: int
    num_failed: int
    num_tokens: int
    shards_written: int  # by this run
    shards_reused: int  # finished by an earlier run
    images_this_run: int
    seconds: float

    @property
    def mean_tokens(self) -> float:
        return self.num_tokens / self.num_tokenized if self.num_tokenized else 0.0

    @property
    def images_per_second(self) -> float:
        return self.images_this_run / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_status(self) -> int:
        """0 when every input was tokenized, 3 when some were skipped (see ``errors.jsonl``)."""
        return EXIT_SKIPPED if self.num_failed else 0

    def line(self) -> str:
        reused = f", {self.shards_reused} shards from an earlier run" if self.shards_reused else ""
        return (f"tokenized {self.num_tokenized} of {self.num_inputs} images ({self.num_failed} failed), "
                f"{self.num_tokens} tokens, mean {self.mean_tokens:.1f} per image; {self.images_this_run} images in "
                f"{self.seconds:.1f} s ({self.images_per_second:.1f} images/s){reused} -> {self.output_dir}")


# ---- the job: settings, shard plan, assembling rows into shards -------------------------------------------------
def encode_settings(tok: AdaptiveTokenizer, encode_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``tok.encode`` keyword arguments as recorded (``budget`` spelled ``max_tokens``, None values dropped, and
    with ``halt_threshold`` the *effective* ``length_rule``, the default resolved for this model, so a resumed job
    never mixes rules); a name ``encode`` does not take is a TypeError now rather than after the first batch."""
    kwargs = {k: v for k, v in dict(encode_kwargs or {}).items() if v is not None}
    if "budget" in kwargs:
        kwargs["max_tokens"] = resolve_max_tokens(kwargs.get("max_tokens"), kwargs.pop("budget"))
    parameters = inspect.signature(tok.encode).parameters
    unknown = sorted(set(kwargs) - set(parameters) | ({"images"} & set(kwargs)))
    if unknown:
        raise InputTypeError(f"unknown encode options {unknown}; AdaptiveTokenizer.encode takes "
                             f"{[p for p in parameters if p != 'images']}")
    if "halt_threshold" in kwargs:
        kwargs["length_rule"] = resolve_length_rule(tok.model, kwargs["halt_threshold"], kwargs.get("length_rule"))
    return dict(sorted(kwargs.items()))


@dataclass(frozen=True)
class ShardPlan:
    """Inputs ``[k * shard_size, (k + 1) * shard_size)`` of the source form shard ``k``."""

    num_inputs: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_inputs // self.shard_size)

    def positions(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_inputs))

    def shard_of(self, position: int) -> int:
        return position // self.shard_size


class ShardAssembler:
    """Collects encoded rows and failures (in any order) and writes each shard once all its inputs are in."""

    def __init__(self, directory: Path, source: DatasetSource, plan: ShardPlan, settings: dict[str, Any],
                 about: dict[str, str], latent_dim: int | None):
        self.directory, self.source, self.plan, self.latent_dim = directory, source, plan, latent_dim
        self.settings, self.about = settings, about
        self._rows: dict[int, dict[int, tuple]] = {}
        self._failures: dict[int, dict[int, Failure]] = {}
        self.written: list[ShardStats] = []

    def add_row(self, position: int, tokens: Tensor, error: float | None, predicted_error: float | None) -> None:
        self._rows.setdefault(self.plan.shard_of(position), {})[position] = (tokens, error, predicted_error)
        self._maybe_write(self.plan.shard_of(position))

    def add_failure(self, position: int, reason: str) -> None:
        failure = Failure(position, self.source.keys[position], reason)
        self._failures.setdefault(self.plan.shard_of(position), {})[position] = failure
        self._maybe_write(self.plan.shard_of(position))

    @property
    def open_shards(self) -> list[int]:
        return sorted(set(self._rows) | set(self._failures))

    def _maybe_write(self, shard: int) -> None:
        rows, failures = self._rows.get(shard, {}), self._failures.get(shard, {})
        if len(rows) + len(failures) < len(self.plan.positions(shard)):
            return
        positions = sorted(rows)
        tokens = [rows[p][0] for p in positions]
        adaptive = "halt_threshold" in self.settings["encode"]
        table = shard_table(positions, [self.source.keys[p] for p in positions], tokens, [len(t) for t in tokens],
                            [rows[p][1] for p in positions] if adaptive else None,
                            [rows[p][2] for p in positions] if adaptive else None, self.latent_dim)
        self.written.append(write_shard(self.directory, shard, table, [failures[p] for p in sorted(failures)],
                                        self.settings, self.about))
        self._rows.pop(shard, None)
        self._failures.pop(shard, None)


def read_pixels(source: DatasetSource, position: int, image_size: int) -> Tensor | str:
    """Input ``position`` as the model sees it, or why it cannot be read (see :func:`decode_image`)."""
    return decode_image(lambda: source.image(position), image_size)


def decode_image(get_image: Callable[[], ImageInput], image_size: int) -> Tensor | str:
    """``get_image()`` as the model sees it (``[3, S, S]`` float32, through the library's own loader, so tokens
    equal ``tok.encode(path)``), or why it cannot be read: ``"ExceptionType: message"``."""
    try:
        return load_images([get_image()], image_size)[0]
    except Exception as err:  # noqa: BLE001 - any unreadable input is recorded and skipped, never fatal
        message = " ".join(str(err).split())
        return f"{type(err).__name__}: {message}" if message else type(err).__name__


# ---- the public function ----------------------------------------------------------------------------------------
def tokenize_dataset(source: Any, output_dir: str | os.PathLike, *, model: Any = None,
                     encode_kwargs: Mapping[str, Any] | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                     batch_size: int = 16, engine: str = "local", workers: int | None = None,
                     cpus_per_worker: float = 0.5, gpus_per_worker: float = 0.0, device: str | torch.device | None = None,
                     dtype: str | torch.dtype | None = None, image_column: str = "image",
                     progress: bool | None = None) -> TokenizeSummary:
    """Tokenize every image of ``source`` into Parquet shards in ``output_dir`` (resuming a job already there).

    ``source``: a folder (searched recursively for the image types Pillow reads), a text file listing image paths,
    a ``datasets.Dataset`` (its ``image_column``) or, with ``engine="ray"``, a ``ray.data.Dataset`` (with a
    ``key`` or ``path`` column naming rows and an ``image_column`` or ``path`` column).
    ``model``: anything ``AdaptiveTokenizer.from_pretrained`` takes (default: the embedded model) or a tokenizer.
    ``encode_kwargs``: ``tok.encode`` keyword arguments (``max_tokens``/``budget``, ``halt_threshold``, ...), recorded
    in the settings. ``shard_size``: inputs per shard. ``batch_size``: images per ``encode`` call.
    ``engine``: ``"local"`` (``workers`` image-decoding threads, default 2; the model on ``device``) or ``"ray"``
    (``workers`` actors, default 1, each loading the model once with ``cpus_per_worker`` CPUs and
    ``gpus_per_worker`` GPUs; connects to ``RAY_ADDRESS`` if set, else starts a local Ray).
    ``dtype``: the model's (float32 by default; bfloat16, or float16 on CUDA): recorded in the settings, since tokens
    depend on it, so a job is never resumed in another dtype.
    ``progress``: a progress bar (default: when stderr is a terminal). Tokens do not depend on the engine,
    ``workers`` or ``batch_size``.
    """
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {ENGINES}, got {engine!r}")
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size), ("workers", workers or 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if cpus_per_worker <= 0 or gpus_per_worker < 0:
        raise InputError(f"cpus_per_worker must be > 0 and gpus_per_worker >= 0, got {cpus_per_worker}, "
                         f"{gpus_per_worker}")
    if _is_ray_dataset(source):
        if engine != "ray":
            raise InputError("a ray.data.Dataset source needs engine='ray'")
        from .ray_tokenize import ray_dataset_source

        source = ray_dataset_source(source, image_column)
    else:
        source = open_source(source, image_column)
    tok, model_name = _load_model(model, device, dtype)
    identity, weights = model_identity(tok.model)
    from . import __version__

    settings = {"library_version": __version__, "model": identity, "encode": encode_settings(tok, encode_kwargs),
                "dtype": str(tok.dtype).removeprefix("torch."), "shard_size": shard_size, "source": source.identity}
    settings = json.loads(json.dumps(settings))  # as stored (lists, not tuples), so comparisons are like for like
    directory = Path(output_dir)
    plan = ShardPlan(len(source), shard_size)
    about = {"model_name": model_name, "source_description": source.description}  # recorded, not compared
    done = _prepare(directory, settings, about, plan)
    assembler = ShardAssembler(directory, source, plan, settings, about,
                               None if tok.config.quantized else tok.config.latent_dim)
    pending = [k for k in range(plan.num_shards) if k not in done]
    start = time.perf_counter()
    if engine == "local":
        run_local(tok, source, plan, pending, assembler, settings["encode"], batch_size, workers or 2, progress)
    else:
        from .ray_tokenize import run_ray

        run_ray(identity, weights, source, plan, pending, assembler, settings["encode"], batch_size, workers or 1,
                cpus_per_worker, gpus_per_worker, progress, dtype=settings["dtype"])
    if assembler.open_shards:  # every input is a row or a failure; anything else is a bug
        raise RuntimeError(f"shards {assembler.open_shards} did not receive all their inputs")
    return _finish(directory, settings, about, plan, done, assembler.written, time.perf_counter() - start,
                   sum(len(plan.positions(k)) for k in pending))


def _is_ray_dataset(source: Any) -> bool:
    return any(cls.__module__.startswith("ray.data") and cls.__name__ == "Dataset" for cls in type(source).__mro__)


def _load_model(model: Any, device: str | torch.device | None,
                dtype: str | torch.dtype | None) -> tuple[AdaptiveTokenizer, str]:
    if isinstance(model, AdaptiveTokenizer):
        return model.to(device=device, dtype=dtype), "AdaptiveTokenizer instance"
    tok = AdaptiveTokenizer.from_pretrained(model, device=device, dtype=dtype)
    return tok, str(model) if model is not None else "default"


def _prepare(directory: Path, settings: dict[str, Any], about: dict[str, str], plan: ShardPlan) -> dict[int, Path]:
    """Create or check the output folder; the shards finished by an earlier run of the same job."""
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    shards = finished_shards(directory)
    if shards and read_index(directory) is None:
        raise InputError(f"{directory} holds shard files but no index.json; it is not a tokenize output folder")
    check_same_job(directory, settings, shards)
    extra = [k for k in shards if k >= plan.num_shards]
    if extra:
        raise InputError(f"{directory} holds shards {extra} beyond this job's {plan.num_shards}")
    write_index(directory, {"format": FORMAT, "settings": settings, **about, "num_shards": plan.num_shards,
                            "complete": False})
    return shards


def _finish(directory: Path, settings: dict[str, Any], about: dict[str, str], plan: ShardPlan, done: dict[int, Path], written: list[ShardStats], seconds: float, images: int) -> TokenizeSummary:
    stats = sorted([read_stats(path) for path in done.values()] + written, key=lambda s: s.shard)
    failures = [f for s in stats for f in s.failures]
    write_errors(directory, failures)
    summary = TokenizeSummary(directory, plan.num_inputs, sum(s.rows for s in stats), len(failures),
                              sum(s.tokens for s in stats), len(written), len(done), images, seconds)
    write_index(directory, {"format": FORMAT, "settings": settings, **about, "num_shards": plan.num_shards,
                            "complete": True,
                            "shards": [{"file": f"part-{s.shard:05d}.parquet", "rows": s.rows, "tokens": s.tokens,
                                        "failed": len(s.failures)} for s in stats],
                            "totals": {"inputs": summary.num_inputs, "rows": summary.num_tokenized,
                                       "failed": summary.num_failed, "tokens": summary.num_tokens}})
    return summary


# ---- local engine -----------------------------------------------------------------------------------------------
def run_local(tok: AdaptiveTokenizer, source: DatasetSource, plan: ShardPlan, shards: list[int],
              assembler: ShardAssembler, encode_kwargs: dict[str, Any], batch_size: int, workers: int,
              progress: bool | None, lookahead: int = 2) -> None:
    """Encode ``shards`` batch by batch while ``workers`` threads decode the next ``lookahead`` batches."""
    batches = iter([plan.positions(k)[i : i + batch_size] for k in shards
                    for i in range(0, len(plan.positions(k)), batch_size)])
    total = sum(len(plan.positions(k)) for k in shards)
    size = tok.config.image_size
    with ThreadPoolExecutor(workers, thread_name_prefix="tokenize-decode") as pool, \
            tqdm(total=total, unit="img", desc="tokenizing", file=sys.stderr,
                 disable=None if progress is None else not progress) as bar:
        queued: deque[tuple[range, list[Future]]] = deque()
        try:
            for positions, decoded in _prefetched(pool, batches, source, size, lookahead, queued):
                good = [(p, px) for p, px in zip(positions, decoded) if isinstance(px, Tensor)]
                for position, reason in zip(positions, decoded):
                    if isinstance(reason, str):
                        assembler.add_failure(position, reason)
                if good:
                    result = tok.encode(torch.stack([px for _, px in good]), batch_size=len(good), **encode_kwargs)
                    _add_result(assembler, [p for p, _ in good], result)
                bar.update(len(positions))
        finally:
            for _, futures in queued:
                for future in futures:
                    future.cancel()


def _prefetched(pool: ThreadPoolExecutor, batches: Iterator[range], source: DatasetSource, size: int,
                lookahead: int, queued: deque) -> Iterator[tuple[range, list[Tensor | str]]]:
    """Decoded batches in order, keeping ``lookahead`` batches queued in the pool ahead of the one returned."""
    def submit() -> None:
        for positions in batches:
            queued.append((positions, [pool.submit(read_pixels, source, p, size) for p in positions]))
            if len(queued) > lookahead:
                return

    submit()
    while queued:
        positions, futures = queued.popleft()
        submit()
        yield positions, [future.result() for future in futures]


def _add_result(assembler: ShardAssembler, positions: list[int], result: Any) -> None:
    for row, position in enumerate(positions):
        error = None if result.errors is None else float(result.errors[row])
        predicted = None if result.predicted_errors is None else float(result.predicted_errors[row])
        assembler.add_row(position, result.tokens[row], error, predicted)
