"""Image folder data: a deterministic train/validation split by file-name hash, decoded once into a uint8 cache,
random-scale crops + horizontal flips for training, and the library's own evaluation transform for validation.

Works on any folder of images (searched recursively), e.g. ImageNet's train folder: when there are more files
than ``max_cache`` the images are decoded on the fly (JPEG draft mode) in loader processes instead of cached.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
import numpy as np
from PIL import Image, ImageOps
from torch import Tensor

from adaptive_tokenizer.image_io import IMAGE_SUFFIXES, open_image, pil_to_tensor, to_rgb
from adaptive_tokenizer.metrics import grey

from .common import atomic_write_text, file_list_hash, repo_relative


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder`` (recursive), as sorted POSIX paths relative to it."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    names = [p.relative_to(root).as_posix() for p in root.rglob("*")
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not names:
        raise ValueError(f"no image files under {root}")
    return sorted(names)


def _name_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def split_files(names: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split: the ``ceil(val_fraction * n)`` files with the smallest sha256(name) are validation."""
    count = math.ceil(val_fraction * len(names)) if val_fraction > 0 else 0
    by_hash = sorted(names, key=_name_hash)
    val = set(by_hash[:count])
    return [n for n in names if n not in val], [n for n in names if n in val]


def prepare_split(folder: str | os.PathLike, out: Path, val_fraction: float) -> tuple[list[str], list[str], dict]:
    """List + split the folder, write ``OUT/split.json`` and return (train, val, data record for provenance)."""
    names = list_images(folder)
    train, val = split_files(names, val_fraction)
    record = {"folder": repo_relative(folder), "num_files": len(names), "file_list_sha256": file_list_hash(names),
              "num_train": len(train), "num_val": len(val), "val_fraction": val_fraction,
              "split_rule": "validation = the ceil(val_fraction*n) files with the smallest sha256(relative path)"}
    corpus_readme = Path(folder).resolve().parent / "README.md"
    if corpus_readme.is_file():
        record["corpus_readme"] = repo_relative(corpus_readme)
        for extra in ("manifest.csv", "provenance.csv"):
            if (corpus_readme.parent / extra).is_file():
                record[extra.replace(".", "_")] = repo_relative(corpus_readme.parent / extra)
    sources = source_summary(folder, train + val)
    if sources:
        record["sources"] = sources
    atomic_write_text(out / "split.json", json.dumps({**record, "train": train, "val": val}, indent=1) + "\n")
    return train, val, record


def source_summary(folder: str | os.PathLike, names: list[str]) -> list[dict] | None:
    """Per source package (and licence) file counts, from a ``manifest.csv`` beside the image folder (the
    corpus format: columns file, source_package, version, license), or None when there is none."""
    import csv

    manifest = Path(folder).resolve().parent / "manifest.csv"
    if not manifest.is_file():
        return None
    wanted = {Path(n).name for n in names}
    groups: dict[tuple[str, str, str], int] = {}
    with manifest.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("file") in wanted:
                key = (row.get("source_package", ""), row.get("version", ""), row.get("license", ""))
                groups[key] = groups.get(key, 0) + 1
    return [{"source_package": k[0], "version": k[1], "license": k[2], "files": v}
            for k, v in sorted(groups.items(), key=lambda kv: -kv[1])]


def decode_short_side(path: Path, side: int) -> Tensor:
    """File -> ``[3, h, w]`` uint8, resized (bicubic) so the shorter side is ``side``; the longer is capped at 2x."""
    with Image.open(path) as probe:
        probe.draft("RGB", (side, side))  # JPEG DCT scaling: decode at >= side, much cheaper
        probe.load()
        image = to_rgb(ImageOps.exif_transpose(probe))
    width, height = image.size
    scale = side / min(width, height)
    new_w, new_h = max(side, round(width * scale)), max(side, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    if max(new_w, new_h) > 2 * side:  # centre part of very wide panoramas
        left, top = (new_w - min(new_w, 2 * side)) // 2, (new_h - min(new_h, 2 * side)) // 2
        image = image.crop((left, top, left + min(new_w, 2 * side), top + min(new_h, 2 * side)))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def random_crop(image: Tensor, size: int, ref_size: int, min_scale: float, gen: random.Random,
                grey_fraction: float = 0.0) -> Tensor:
    """Random-scale square crop + flip of a uint8 ``[3, h, w]`` image -> float ``[3, size, size]`` in [0, 1].

    The image is taken at model scale (short side = ``ref_size``, as at inference); the crop covers a fraction
    ``f ~ U(min_scale, 1)`` of the short side times ``size / ref_size`` (so ``size < ref_size`` gives patches at
    the inference pixel scale), at a random position. With probability ``grey_fraction`` the crop is made greyscale
    (its luma, :func:`adaptive_tokenizer.metrics.grey`, in all three channels), so that the model sees greyscale
    photos more often than the corpus' 2%; at 0 no random number is drawn for it (runs resume as before).
    """
    _, h, w = image.shape
    side = max(1, min(h, w, round(gen.uniform(min_scale, 1.0) * min(h, w) * size / ref_size)))
    top, left = gen.randint(0, h - side), gen.randint(0, w - side)
    crop = image[:, top : top + side, left : left + side].float().div_(255)[None]
    if side != size:
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=side > size, align_corners=False)
    crop = crop[0].clamp_(0, 1)
    if gen.random() < 0.5:
        crop = crop.flip(-1)
    if grey_fraction > 0 and gen.random() < grey_fraction:
        crop = grey(crop[None])[0].expand(3, -1, -1).contiguous()
    return crop


class TrainImages:
    """Infinite stream of augmented batches ``[B, 3, size, size]`` float in [0, 1].

    Small folders are decoded once into RAM (``cache_side`` short side); large ones are decoded on the fly by
    ``workers`` loader processes. Deterministic given the seed and the step (resume skips nothing: the sampler
    state is part of the checkpoint through ``state_dict``).
    """

    def __init__(self, folder: str | os.PathLike, names: list[str], size: int, ref_size: int, batch_size: int,
                 min_scale: float, seed: int, cache_side: int = 192, max_cache: int = 20000, workers: int = 0,
                 log=print, grey_fraction: float = 0.0):
        self.root, self.names, self.size, self.ref_size = Path(folder), names, size, ref_size
        self.grey_fraction = grey_fraction
        self.batch_size, self.min_scale, self.cache_side, self.workers = batch_size, min_scale, cache_side, workers
        self.gen = random.Random(seed)
        self.epoch, self.position = 0, 0
        self.order = self._order()
        self.cache: list[Tensor] | None = None
        if len(names) <= max_cache:
            log(f"decoding {len(names)} training images into RAM at short side {cache_side} ...")
            self.cache = [decode_short_side(self.root / n, cache_side) for n in names]
            mb = sum(t.numel() for t in self.cache) / 2**20
            log(f"cache ready: {mb:.0f} MB")
        self.images_seen = 0

    def _order(self) -> list[int]:
        order = list(range(len(self.names)))
        self.gen.shuffle(order)
        return order

    def state_dict(self) -> dict:
        return {"gen": self.gen.getstate(), "epoch": self.epoch, "position": self.position, "order": self.order,
                "images_seen": self.images_seen}

    def load_state_dict(self, state: dict) -> None:
        self.gen.setstate(state["gen"])
        self.epoch, self.position, self.order = state["epoch"], state["position"], state["order"]
        self.images_seen = state.get("images_seen", 0)

    def _next_indices(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if self.position >= len(self.order):
                self.epoch += 1
                self.position = 0
                self.order = self._order()
            out.append(self.order[self.position])
            self.position += 1
        return out

    def _image(self, index: int) -> Tensor:
        if self.cache is not None:
            return self.cache[index]
        return decode_short_side(self.root / self.names[index], self.cache_side)

    def next_batch(self) -> Tensor:
        indices = self._next_indices()
        seeds = [self.gen.randint(0, 2**31) for _ in indices]
        if self.cache is None and self.workers > 0:
            batch = self._pool().map(_load_crop, [(self.root / self.names[i], self.cache_side, self.size,
                                                   self.ref_size, self.min_scale, s, self.grey_fraction)
                                                  for i, s in zip(indices, seeds)])
        else:
            batch = [random_crop(self._image(i), self.size, self.ref_size, self.min_scale, random.Random(s),
                                 self.grey_fraction) for i, s in zip(indices, seeds)]
        self.images_seen += len(batch)
        return torch.stack(batch)

    def _pool(self):
        if not hasattr(self, "_workers_pool"):
            import multiprocessing as mp

            self._workers_pool = mp.get_context("spawn").Pool(self.workers)
        return self._workers_pool

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            yield self.next_batch()


def _load_crop(args) -> Tensor:
    path, cache_side, size, ref_size, min_scale, seed, grey_fraction = args
    torch.set_num_threads(1)
    return random_crop(decode_short_side(path, cache_side), size, ref_size, min_scale, random.Random(seed),
                       grey_fraction)


def load_val_images(folder: str | os.PathLike, names: list[str], size: int, limit: int = 0) -> Tensor:
    """Held-out images with the library's evaluation transform (short side -> size, bicubic, centre crop):
    ``[N, 3, size, size]`` float in [0, 1]. ``limit``: the first N (in split order), 0 = all."""
    names = names[:limit] if limit else names
    return torch.stack([pil_to_tensor(open_image(Path(folder) / n), size) for n in names])
