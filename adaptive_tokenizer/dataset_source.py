"""What ``tokenize`` reads: a folder, a list file or a Hugging Face dataset -> keys in a fixed order + images.

Every source is a :class:`DatasetSource`: ``keys[i]`` names input ``i`` in the output (a path relative to the
folder, the path as the list file spells it, or the dataset index), ``image(i)`` is what
:func:`~adaptive_tokenizer.image_io.load_images` takes for it, and ``identity`` is what a resumed job must match.
The order is fixed (sorted paths, list order, dataset order), so shard ``k`` always holds the same inputs.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile, ImageOps

from .errors import InputError, InputTypeError
from .image_io import ImageInput


@cache
def readable_suffixes() -> frozenset[str]:
    """File suffixes Pillow can open (lower case, with the dot), stub formats that need extra handlers excluded."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and not _is_stub(Image.OPEN[fmt][0]))


def _is_stub(factory: Any) -> bool:
    return isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)


@dataclass(frozen=True)
class DatasetSource:
    """Inputs in a fixed order: ``keys`` (unique strings) and how to get each one's image."""

    kind: str  # "folder", "list", "hf_dataset" or "ray_dataset"
    description: str  # for messages and the index file: the folder, the list file, the dataset's repr
    keys: Sequence[str]
    _images: Any  # folder/list: the paths (list[str]); hf_dataset, ray_dataset: the dataset
    image_column: str | None = None
    key_column: str | None = None  # ray_dataset: the column holding the keys
    fingerprint: str | None = None  # hf_dataset: its fingerprint (its content), recorded in the identity

    def __len__(self) -> int:
        return len(self.keys)

    def image(self, position: int) -> ImageInput:
        """Input ``position``: a path, or the dataset row's image (PIL image, array or tensor)."""
        if self.kind == "hf_dataset":
            return _dataset_image(self._images[position][self.image_column])
        if self.kind == "ray_dataset":
            raise InputTypeError("a ray.data.Dataset has no random access; the Ray engine reads its rows")
        return self._images[position]

    @property
    def dataset(self) -> Any:
        """The ``datasets.Dataset`` or ``ray.data.Dataset`` of a dataset source."""
        return self._images

    @property
    def identity(self) -> dict[str, Any]:
        """What another run must match to continue this job: the kind, the count and a digest of the keys."""
        digest = hashlib.sha256()
        for key in self.keys:
            digest.update(key.encode("utf-8", "surrogateescape") + b"\n")
        identity = {"kind": self.kind, "num_inputs": len(self.keys), "keys_sha256": digest.hexdigest()}
        if self.fingerprint is not None:
            identity["fingerprint"] = self.fingerprint
        return identity


def open_source(source: Any, image_column: str = "image") -> DatasetSource:
    """A folder (images found recursively), a text file listing image paths (one per line; blank lines and lines
    starting with ``#`` skipped; relative paths are relative to the list file's folder) or a Hugging Face
    ``datasets.Dataset`` with an ``image_column``."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return _folder_source(path)
        if path.is_file():
            return _list_source(path)
        raise FileNotFoundError(f"no such folder or list file: {path}")
    if _is_hf_dataset(source):
        return _hf_source(source, image_column)
    raise InputTypeError(f"unsupported source of type {type(source).__name__}: pass a folder of images, a text file "
                         "listing image paths, a datasets.Dataset or (engine='ray') a ray.data.Dataset")


def _folder_source(folder: Path) -> DatasetSource:
    suffixes = readable_suffixes()
    keys = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        relative = Path(root).relative_to(folder)
        keys += [(relative / name).as_posix() for name in files
                 if not name.startswith(".") and os.path.splitext(name)[1].lower() in suffixes]
    if not keys:
        raise InputError(f"no image files in folder {folder} (searched recursively for "
                         f"{', '.join(sorted(suffixes)[:8])}, ...)")
    keys.sort()
    return DatasetSource("folder", str(folder), keys, [str(folder / key) for key in keys])


def _list_source(list_file: Path) -> DatasetSource:
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{list_file} is not a UTF-8 text file listing image paths (one per line)") from None
    keys, paths, seen = [], [], {}
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry in seen:
            raise InputError(f"{list_file} line {number}: {entry!r} is listed twice (first on line {seen[entry]}); "
                             "every input needs a unique key")
        seen[entry] = number
        keys.append(entry)
        paths.append(entry if os.path.isabs(entry) else str(list_file.parent / entry))
    if not keys:
        raise InputError(f"{list_file} lists no image paths (one path per line)")
    return DatasetSource("list", str(list_file), keys, paths)


def _is_hf_dataset(source: Any) -> bool:
    return any(cls.__module__.startswith("datasets.") and cls.__name__ == "Dataset" for cls in type(source).__mro__)


def _hf_source(dataset: Any, image_column: str) -> DatasetSource:
    if image_column not in dataset.column_names:
        raise InputError(f"the dataset has no column {image_column!r} (columns: {dataset.column_names}); pass "
                         "image_column=")
    if len(dataset) == 0:
        raise InputError("the dataset has no rows")
    keys = [str(index) for index in range(len(dataset))]
    return DatasetSource("hf_dataset", repr(dataset), keys, dataset, image_column=image_column,
                         fingerprint=getattr(dataset, "_fingerprint", None))


def _dataset_image(value: Any) -> ImageInput:
    """A dataset cell -> an image input: PIL images, arrays and tensors as they are; ``{"bytes", "path"}`` cells of
    an undecoded ``Image`` feature opened with Pillow."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            with Image.open(io.BytesIO(value["bytes"])) as image:
                image.load()
                return ImageOps.exif_transpose(image)  # as image_io.open_image does for files
        return value["path"]
    return value
