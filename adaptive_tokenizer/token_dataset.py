"""Read a tokenized folder back for training: :class:`TokenDataset` and :func:`collate_tokens`.

>>> data = TokenDataset("tokens/")                      # the output folder of `adaptive-tokenizer tokenize`
>>> collate = functools.partial(collate_tokens, offset=1000, begin_id=5096, end_id=5097, pad_id=5098)
>>> loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, collate_fn=collate)

Only the shards' footers are read up front; rows are read one Parquet row group (1024 rows) at a time through a
memory map, and the last few row groups are kept (``cache_row_groups``). Random access to rows far apart decodes a
row group per row: for large folders prefer a sampler that shuffles within shards or row groups.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import InputError, MissingExtraError
from .config import ModelConfig
from .token_shards import ERRORS_NAME, INDEX_NAME, read_index, shard_info, shard_name
from .tokenizer import EncodeResult

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError("reading tokenized datasets needs pyarrow: "
                            "pip install 'adaptive-tokenizer[datasets]'") from None


class TokenDataset(Dataset):
    """The rows of a tokenized folder in source order: ``{"key", "tokens", "num_tokens"}`` (+ ``"error"`` for
    adaptive runs); ``tokens`` is int64 ``[L]`` (quantized models) or float32 ``[L, D]`` (continuous).

    Refuses a folder whose job has not finished (rerun the tokenize command) unless ``allow_incomplete``.
    Picklable (DataLoader workers open the files themselves).
    """

    def __init__(self, directory: str | os.PathLike, *, allow_incomplete: bool = False, cache_row_groups: int = 4):
        self.directory = Path(directory)
        index = read_index(self.directory)
        if index is None:
            raise FileNotFoundError(f"{self.directory} has no {INDEX_NAME}: not the output of adaptive-tokenizer "
                                    "tokenize")
        if not index.get("complete") and not allow_incomplete:
            raise InputError(f"the tokenize job in {self.directory} has not finished; rerun the same command to "
                             "complete it (or pass allow_incomplete=True to read the finished shards)")
        self.settings: dict[str, Any] = index["settings"]
        self.config = ModelConfig.from_dict(self.settings["model"]["config"])  # the tokenizer's (codebook_size, ...)
        self._paths, group_rows = [], []
        for shard in range(index["num_shards"]):
            path = self.directory / shard_name(shard)
            if not path.is_file():
                if allow_incomplete:
                    continue
                raise FileNotFoundError(f"{path} is missing; rerun the tokenize command to rewrite it")
            metadata = pq.read_metadata(path)
            self._paths.append(path)
            group_rows.append([metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])
        # rows of (file, row group) pairs, flattened, and where each pair starts
        self._groups = [(f, g) for f, rows in enumerate(group_rows) for g in range(len(rows))]
        counts = np.array([n for rows in group_rows for n in rows], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._cache_size = max(1, cache_row_groups)
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def num_tokens(self) -> np.ndarray:
        """Every row's token count ``[len(self)]`` int64, in row order, from the shards' ``num_tokens`` column alone
        (for length-grouped sampling: ``adaptive_tokenizer.vlm.length_grouped_sampler``)."""
        columns = [pq.read_table(path, columns=["num_tokens"]).column("num_tokens").to_numpy() for path in self._paths]
        return np.concatenate(columns).astype(np.int64) if columns else np.zeros(0, dtype=np.int64)

    @property
    def errors_file(self) -> Path:
        """``errors.jsonl``: the inputs that were skipped, with reasons."""
        return self.directory / ERRORS_NAME

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        index %= len(self)
        group = int(np.searchsorted(self._starts, index, side="right")) - 1
        return row_sample(self._row_group(group), index - int(self._starts[group]), self.config.quantized)

    def _row_group(self, group: int) -> pa.Table:
        if group in self._cache:
            self._cache.move_to_end(group)
            return self._cache[group]
        file, row_group = self._groups[group]
        table = pq.ParquetFile(self._paths[file], memory_map=True).read_row_group(row_group)
        self._cache[group] = table
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return table

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": OrderedDict()}


def row_sample(table: pa.Table, row: int, quantized: bool) -> dict[str, Any]:
    """Row ``row`` of a shard's table as a sample: ``{"key", "tokens", "num_tokens"(, "error")}``."""
    values = table.column("tokens")[row].values
    if quantized:
        tokens = torch.from_numpy(values.to_numpy().astype(np.int64))
    else:
        tokens = torch.from_numpy(values.flatten().to_numpy().reshape(len(values), values.type.list_size).copy())
    sample = {"key": table.column("key")[row].as_py(), "tokens": tokens,
              "num_tokens": table.column("num_tokens")[row].as_py()}
    if "error" in table.column_names:
        sample["error"] = table.column("error")[row].as_py()
    return sample


def read_tokenized(path: str | os.PathLike) -> tuple[list[Tensor], list[str], dict[str, Any]]:
    """Every row of a folder written by ``adaptive-tokenizer tokenize`` (finished shards), or of one of its shards:
    (token sequences, keys, the job's settings)."""
    path = Path(path)
    if path.is_dir():
        data = TokenDataset(path, allow_incomplete=True)
        samples, settings = [data[i] for i in range(len(data))], data.settings
    else:
        settings = shard_info(path)["settings"]
        table = pq.read_table(path)
        quantized = ModelConfig.from_dict(settings["model"]["config"]).quantized
        samples = [row_sample(table, row, quantized) for row in range(table.num_rows)]
    if not samples:
        raise InputError(f"{path} holds no tokenized rows")
    return [sample["tokens"] for sample in samples], [sample["key"] for sample in samples], settings


def collate_tokens(samples: Sequence[dict[str, Any]], *, pad_id: int | float = 0, offset: int = 0,
                   begin_id: int | None = None, end_id: int | None = None) -> dict[str, Tensor]:
    """A batch of :class:`TokenDataset` samples -> ``{"input_ids" [N, Lmax] int64, "attention_mask" [N, Lmax]
    bool (True on real tokens), "lengths" [N] int64}``, right-padded with ``pad_id``.

    Quantized tokens: each sequence becomes ``[begin_id] (ids + offset) [end_id]`` (``begin_id``/``end_id`` only
    when given; ``offset`` places the image codes inside a larger vocabulary), and ``lengths`` counts them too.
    Continuous tokens give ``"inputs" [N, Lmax, D]`` float32 instead of ``"input_ids"``; ``offset`` and the
    begin/end ids do not apply to them.
    """
    if not samples:
        raise InputError("collate_tokens got an empty batch")
    sequences = [sample["tokens"] for sample in samples]
    if sequences[0].is_floating_point():
        if offset or begin_id is not None or end_id is not None:
            raise InputError("offset, begin_id and end_id apply to token ids; these tokens are continuous vectors")
        name = "inputs"
    else:
        name = "input_ids"
        extra_begin = [torch.tensor([begin_id])] if begin_id is not None else []
        extra_end = [torch.tensor([end_id])] if end_id is not None else []
        sequences = [torch.cat([*extra_begin, seq + offset, *extra_end]) for seq in sequences]
    lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.int64)
    padded, mask = EncodeResult(sequences, lengths).padded(pad_id)
    return {name: padded, "attention_mask": mask, "lengths": lengths}
