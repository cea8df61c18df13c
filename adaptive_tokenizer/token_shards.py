"""The on-disk layout of a tokenized dataset: Parquet shards, ``index.json`` and ``errors.jsonl``.

``OUTPUT_DIR/part-00000.parquet, part-00001.parquet, ...``: shard ``k`` holds inputs ``k * shard_size`` up to
``(k + 1) * shard_size`` of the source, in source order, one row per input that could be read:

- ``index`` (int64): the input's position in the source; ``key`` (string): its path relative to the folder, the
  list file's line or the dataset index;
- ``tokens``: ``list<int32>`` code ids (quantized models) or ``list<fixed_size_list<float32, D>>`` (continuous);
- ``num_tokens`` (int32); for adaptive runs (``halt_threshold``) also ``error`` and ``predicted_error`` (float32,
  nullable): the reconstruction's *measured* mean absolute pixel error at the chosen length (length rules
  ``exact``, ``search`` and ``verified``; null for ``predicted``) and the length predictor's *estimate* of it
  (``verified`` and ``predicted`` rules; else null).

Each shard's Parquet metadata (key ``adaptive_tokenizer``) holds the job's settings (model config and weights
sha256, encode arguments, shard size, source identity, library version), the model's name, the shard's position
and the inputs it skipped (key and reason). ``index.json`` holds the settings, the shard count and, once every shard is
written, the totals; ``errors.jsonl`` one ``{"index", "key", "reason"}`` line per skipped input. A shard is
written to a temporary name and renamed, so a shard file present is a complete shard.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from .errors import InputError, MissingExtraError
from .io_utils import write_atomic

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError("tokenizing datasets needs pyarrow: pip install 'adaptive-tokenizer[datasets]'") from None

FORMAT = "adaptive-tokenizer-shards/1"
INDEX_NAME = "index.json"
ERRORS_NAME = "errors.jsonl"
METADATA_KEY = b"adaptive_tokenizer"
ROW_GROUP_ROWS = 1024
_SHARD_NAME = re.compile(r"part-(\d{5,})\.parquet")


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


@dataclass(frozen=True)
class Failure:
    """An input that was skipped: its position, key and why."""

    index: int
    key: str
    reason: str


@dataclass(frozen=True)
class ShardStats:
    """What a written shard holds (read back from its metadata)."""

    shard: int
    rows: int
    tokens: int
    failures: list[Failure]


def shard_table(indices: Sequence[int], keys: Sequence[str], tokens: Sequence[Tensor], num_tokens: Sequence[int],
                errors: Sequence[float | None] | None, predicted_errors: Sequence[float | None] | None,
                latent_dim: int | None,
                ) -> pa.Table:
    """Rows -> an Arrow table with the shard schema (``latent_dim`` None: quantized ids, else continuous vectors)."""
    lengths = np.asarray(num_tokens, dtype=np.int32)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    if latent_dim is None:
        flat = np.concatenate([t.numpy() for t in tokens]).astype(np.int32) if tokens else np.zeros(0, np.int32)
        values = pa.array(flat, type=pa.int32())
    else:
        flat = (np.concatenate([t.numpy() for t in tokens]).astype(np.float32).reshape(-1) if tokens
                else np.zeros(0, np.float32))
        values = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), latent_dim)
    columns = {"index": pa.array(np.asarray(indices, dtype=np.int64)),
               "key": pa.array(list(keys), type=pa.string()),
               "tokens": pa.ListArray.from_arrays(pa.array(offsets), values),
               "num_tokens": pa.array(lengths)}
    if errors is not None:
        columns["error"] = pa.array(list(errors), type=pa.float32())
        columns["predicted_error"] = pa.array(list(predicted_errors), type=pa.float32())
    return pa.table(columns)


def write_shard(directory: Path, shard: int, table: pa.Table, failures: Sequence[Failure],
                settings: dict[str, Any], about: dict[str, str] | None = None) -> ShardStats:
    """Write shard ``shard`` atomically (it appears complete or not at all), with the job's settings, ``about``
    (model name, source description: recorded, not compared) and the skipped inputs in its metadata."""
    stats = ShardStats(shard, table.num_rows, int(table["num_tokens"].to_numpy().sum()), list(failures))
    info = {"format": FORMAT, "settings": settings, **(about or {}), "shard": shard, "rows": stats.rows, "tokens": stats.tokens,
            "failures": [f.__dict__ for f in failures]}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(info).encode()})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP_ROWS, compression="zstd")
    write_atomic(directory / shard_name(shard), buffer.getvalue().to_pybytes())
    return stats


def shard_info(path: Path) -> dict[str, Any]:
    """A shard's metadata (settings, shard number, rows, tokens, failures), read from the Parquet footer only."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        info = json.loads(metadata[METADATA_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException) as err:
        raise InputError(f"{path} is not a shard written by adaptive-tokenizer tokenize ({err})") from None
    if info.get("format") != FORMAT:
        raise InputError(f"{path}: shard format {info.get('format')!r}, expected {FORMAT!r}")
    return info


def finished_shards(directory: Path) -> dict[int, Path]:
    """The complete shard files in ``directory`` by shard number (temporary files of unfinished writes ignored)."""
    found = {}
    for path in directory.iterdir() if directory.is_dir() else ():
        match = _SHARD_NAME.fullmatch(path.name)
        if match:
            found[int(match[1])] = path
    return dict(sorted(found.items()))


def read_stats(path: Path) -> ShardStats:
    info = shard_info(path)
    return ShardStats(info["shard"], info["rows"], info["tokens"], [Failure(**f) for f in info["failures"]])


# ---- index.json and errors.jsonl ------------------------------------------------------------------------------
def read_index(directory: Path) -> dict[str, Any] | None:
    """``directory/index.json``, or None when there is none."""
    path = directory / INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path}: {err}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise InputError(f"{path} is not the index of a tokenized dataset (format {FORMAT!r})")
    return index


def write_index(directory: Path, index: dict[str, Any]) -> None:
    write_atomic(directory / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())


def write_errors(directory: Path, failures: Sequence[Failure]) -> None:
    """``errors.jsonl``: one line per skipped input, in source order (rewritten whole, atomically)."""
    lines = [json.dumps(f.__dict__) + "\n" for f in sorted(failures, key=lambda f: f.index)]
    write_atomic(directory / ERRORS_NAME, "".join(lines).encode())


def check_same_job(directory: Path, settings: dict[str, Any], shards: dict[int, Path]) -> None:
    """Refuse to continue a job in ``directory`` whose finished shards were made with other settings."""
    for path in shards.values():
        recorded = normalized_settings(shard_info(path)["settings"])
        if recorded != settings:
            differences = sorted(_differences(recorded, settings))
            raise InputError(
                f"{directory} already holds shards tokenized with other settings ({'; '.join(differences)}); "
                f"use another output folder, or delete {directory} to start over")


def normalized_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as recorded now, from shards written before some were: a ``halt_threshold`` without
    ``length_rule`` ran the default of that time, ``"exact"``; no ``dtype`` was float32."""
    encode = settings.get("encode", {})
    if "halt_threshold" in encode and "length_rule" not in encode:
        settings = {**settings, "encode": dict(sorted({**encode, "length_rule": "exact"}.items()))}
    if "dtype" not in settings:
        settings = {**settings, "dtype": "float32"}
    return settings


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        return out
    if old == new:
        return []
    shown = [json.dumps(v) if len(json.dumps(v)) <= 60 else json.dumps(v)[:57] + "..." for v in (old, new)]
    return [f"{where}: {shown[0]} before, {shown[1]} now"]


def remove_stale_temporaries(directory: Path) -> None:
    """Delete the temporary files of writes that were killed (``write_atomic`` names them ``.NAME.HEX.tmp``)."""
    for pattern in (".part-*.parquet.*.tmp", f".{INDEX_NAME}.*.tmp", f".{ERRORS_NAME}.*.tmp"):
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)
