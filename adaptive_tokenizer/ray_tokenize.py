"""Ray engine of :func:`~adaptive_tokenizer.tokenize_dataset.tokenize_dataset` (``pip install
"adaptive-tokenizer[ray]"``).

Ray Data reads the inputs, decodes images in tasks (``DECODE_CPUS`` each) and streams them through
``map_batches`` to a pool of actors that each build the model once (from the weights the driver hashed, shipped
through the object store: workers need no model files or Hub access) and call ``tok.encode`` on batches. Rows come
back to the driver, which writes the same shards as the local engine (same order, same bytes). Actors reserve
fractional CPUs (``cpus_per_worker``, default 0.5) so that on a small machine the decode tasks still find a CPU.

Ray connects to the cluster of ``RAY_ADDRESS`` when it is set and starts a local instance otherwise; a Ray
already initialized in this process is used as it is.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from safetensors.torch import load

from .errors import InputError, MissingExtraError
from .config import ModelConfig
from .dataset_source import DatasetSource
from .model import ALITModel
from .tokenize_dataset import ShardAssembler, ShardPlan, decode_image, read_pixels
from .serialization import check_weights
from .tokenizer import AdaptiveTokenizer

try:
    import ray
    import ray.data
except ImportError:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError("engine='ray' needs Ray Data: pip install 'adaptive-tokenizer[ray]'") from None

DECODE_CPUS = 0.25


def run_ray(identity: dict[str, Any], weights: bytes, source: DatasetSource, plan: ShardPlan, shards: list[int],
            assembler: ShardAssembler, encode_kwargs: dict[str, Any], batch_size: int, workers: int,
            cpus_per_worker: float, gpus_per_worker: float, progress: bool | None, dtype: str = "float32") -> None:
    """Encode the inputs of ``shards`` on Ray and hand every row (or failure) to ``assembler``."""
    pending = {p for k in shards for p in plan.positions(k)}
    if not pending:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False)  # honours RAY_ADDRESS; else a local instance
    try:
        ray.data.DataContext.get_current().enable_progress_bars = progress is not False
        size = identity["config"]["image_size"]
        if source.kind == "ray_dataset":
            positions = {key: index for index, key in enumerate(source.keys)}
            data = source.dataset.map_batches(_decode_rows, fn_kwargs={
                "positions": positions, "pending": pending, "key_column": source.key_column,
                "image_column": source.image_column, "image_size": size}, batch_size=batch_size, num_cpus=DECODE_CPUS)
        else:
            data = ray.data.from_items([{"position": p} for p in sorted(pending)])
            data = data.map_batches(_decode_positions, fn_kwargs={"source": source, "image_size": size},
                                    batch_size=batch_size, num_cpus=DECODE_CPUS)
        data = data.map_batches(_Encoder, fn_constructor_kwargs={
            "config": identity["config"], "weights": ray.put(weights), "weights_sha256": identity["weights_sha256"],
            "encode_kwargs": encode_kwargs, "device": "cuda" if gpus_per_worker > 0 else "cpu", "dtype": dtype,
            "threads": max(1, int(cpus_per_worker))}, batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)
        dims = None if identity["config"]["latent_kind"] == "quantized" else assembler.latent_dim
        for row in data.iter_rows():
            position = int(row["position"])
            if row["failure"]:
                assembler.add_failure(position, str(row["failure"]))
                continue
            tokens = np.frombuffer(row["tokens"], dtype=np.int64 if dims is None else np.float32)
            error, predicted = float(row["error"]), float(row["predicted_error"])
            assembler.add_row(position, torch.from_numpy(tokens.copy() if dims is None else tokens.reshape(-1, dims)),
                              None if np.isnan(error) else error, None if np.isnan(predicted) else predicted)
    finally:
        if started:
            ray.shutdown()


def _pixel_batch(positions: list[int], decoded: list[torch.Tensor | str], size: int) -> dict[str, np.ndarray]:
    pixels = np.zeros((len(decoded), 3, size, size), dtype=np.float32)
    failures = []
    for row, item in enumerate(decoded):
        if isinstance(item, str):
            failures.append(item)
        else:
            pixels[row] = item.numpy()
            failures.append("")
    return {"position": np.asarray(positions, dtype=np.int64), "pixels": pixels, "failure": np.asarray(failures,
                                                                                                        dtype=object)}


def _decode_positions(batch: dict[str, np.ndarray], source: DatasetSource, image_size: int) -> dict[str, np.ndarray]:
    positions = [int(p) for p in batch["position"]]
    return _pixel_batch(positions, [read_pixels(source, p, image_size) for p in positions], image_size)


def _decode_rows(batch: dict[str, np.ndarray], positions: dict[str, int], pending: set[int], key_column: str,
                 image_column: str, image_size: int) -> dict[str, np.ndarray]:
    """Rows of a ``ray.data.Dataset`` source: their position from their key, pending ones decoded."""
    rows = [(positions[str(key)], row) for row, key in enumerate(batch[key_column])
            if positions[str(key)] in pending]
    decoded = [decode_image(lambda row=row: _cell(batch[image_column][row]), image_size) for _, row in rows]
    return _pixel_batch([p for p, _ in rows], decoded, image_size)


def _cell(value: Any) -> Any:
    return value.item() if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0 else value


class _Encoder:
    """A Ray actor: builds the model once, then ``tok.encode`` on each batch of decoded images."""

    def __init__(self, config: dict[str, Any], weights: ray.ObjectRef, weights_sha256: str,
                 encode_kwargs: dict[str, Any], device: str, threads: int, dtype: str = "float32"):
        weights = ray.get(weights)
        if hashlib.sha256(weights).hexdigest() != weights_sha256:
            raise RuntimeError("the model weights changed on their way to the Ray worker")
        torch.set_num_threads(threads)
        model_config = ModelConfig.from_dict(config)
        tensors = load(weights)
        check_weights(model_config, tensors, "weights sent to the Ray worker")
        model = ALITModel(model_config)
        model.load_state_dict(tensors, strict=True, assign=True)
        self.tok = AdaptiveTokenizer(model).to(device=device, dtype=dtype)
        self.encode_kwargs = encode_kwargs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["position"])
        good = [row for row in range(n) if not batch["failure"][row]]
        tokens = np.full(n, b"", dtype=object)
        errors = np.full(n, np.nan, dtype=np.float32)
        predicted = np.full(n, np.nan, dtype=np.float32)
        if good:
            result = self.tok.encode(torch.from_numpy(np.ascontiguousarray(batch["pixels"][good])),
                                     batch_size=len(good), **self.encode_kwargs)
            dtype = torch.int64 if self.tok.config.quantized else torch.float32
            for index, row in enumerate(good):
                tokens[row] = result.tokens[index].to(dtype).numpy().tobytes()
                if result.errors is not None:
                    errors[row] = float(result.errors[index])
                if result.predicted_errors is not None:
                    predicted[row] = float(result.predicted_errors[index])
        return {"position": batch["position"], "failure": batch["failure"], "tokens": tokens, "error": errors,
                "predicted_error": predicted}


def ray_dataset_source(dataset: Any, image_column: str = "image") -> DatasetSource:
    """A ``ray.data.Dataset`` as a source: rows named by their ``key`` column (else ``path``, as
    ``ray.data.read_images(..., include_paths=True)`` gives), sorted by it; images from ``image_column`` (else
    ``path``)."""
    columns = dataset.columns() or []
    key_column = next((c for c in ("key", "path") if c in columns), None)
    if key_column is None:
        raise InputError(f"a ray.data.Dataset source needs a 'key' or 'path' column naming each row (columns: "
                         f"{columns}); read images with include_paths=True, or add a key column")
    pixels_column = image_column if image_column in columns else "path" if "path" in columns else None
    if pixels_column is None:
        raise InputError(f"a ray.data.Dataset source needs an {image_column!r} or 'path' column (columns: {columns})")
    keys = [str(k) for k in dataset.select_columns([key_column]).to_pandas()[key_column]]
    if len(set(keys)) != len(keys):
        raise InputError(f"the {key_column!r} column of the ray.data.Dataset repeats values; keys must be unique")
    if not keys:
        raise InputError("the ray.data.Dataset has no rows")
    return DatasetSource("ray_dataset", f"ray.data.Dataset({', '.join(columns)})", sorted(keys), dataset,
                         image_column=pixels_column, key_column=key_column)

