"""Image input/output: anything a user may hold -> ``[N, 3, S, S]`` float32 in [0, 1], and back to PNG.

Preprocessing is the authors' evaluation transform: convert to RGB, resize so the shorter side is ``S``
(bicubic, antialiased; the longer side becomes ``int(S * long / short)``), then centre-crop to ``S x S``
(offset ``round((size - S) / 2)``), then ``uint8 / 255``. A PIL image more than ``CROP_FIRST_ASPECT`` times wider
than high (or higher than wide) is cropped before it is scaled (only the source window behind the crop is
resampled; the same pixels up to 8-bit rounding), so no image is resampled into more than ``4 S x S`` pixels.

Inputs are bounded before any pixel is decoded or resampled: at most ``MAX_IMAGE_PIXELS`` pixels per image and a
longer side at most ``MAX_ASPECT_RATIO`` times the shorter one (module attributes: raise them to accept more).
Whatever Pillow rejects in a file (corrupt, truncated, unsupported, a decompression bomb) becomes a ValueError.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from torch import Tensor
from .errors import InputError, InputTypeError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, Tensor]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

ACCEPTED = ("a path, a PIL image, an HxWxC or HxW uint8 numpy array, a 3xHxW or Nx3xHxW float tensor in [0, 1] "
            "(or uint8 tensor), or a list or any other iterable of these")


MAX_IMAGE_PIXELS = 64_000_000  # per image (8000 x 8000): 192 MB as RGB, 768 MB as float32 (tensor inputs)
MAX_ASPECT_RATIO = 100  # longer side / shorter side; the centre crop of a wider image keeps under 1% of it
CROP_FIRST_ASPECT = 4  # PIL images whose resized longer side would exceed 4 S are cropped before they are scaled
# What Pillow raises on a file it cannot decode (besides OSError: struct/EOF/syntax errors from broken headers).
_PIL_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError,
               KeyError, TypeError, ZeroDivisionError, Image.DecompressionBombError)


def check_image_size(width: int, height: int, what: str = "image") -> None:
    """Refuse empty images, more than ``MAX_IMAGE_PIXELS`` pixels or an aspect ratio above ``MAX_ASPECT_RATIO``."""
    if width < 1 or height < 1:
        raise InputError(f"{what} is {width}x{height} pixels: empty")
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{what} is {width}x{height} = {width * height:,} pixels, above the limit of "
                         f"{MAX_IMAGE_PIXELS:,} (downscale it first, or raise adaptive_tokenizer.image_io."
                         f"MAX_IMAGE_PIXELS)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InputError(f"{what} is {width}x{height} pixels, an aspect ratio above the limit of "
                         f"{MAX_ASPECT_RATIO}:1 (the centre crop would keep too little of it; crop it first, or "
                         f"raise adaptive_tokenizer.image_io.MAX_ASPECT_RATIO)")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file (EXIF orientation applied), with a clear error for missing, unreadable or oversized
    files; the size is checked from the header, before any pixel is decoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise InputError(f"{path} is too large to load ({err}); the limit is {MAX_IMAGE_PIXELS:,} pixels (downscale "
                         "it first, or raise adaptive_tokenizer.image_io.MAX_IMAGE_PIXELS and, for Pillow's own "
                         "check, PIL.Image.MAX_IMAGE_PIXELS)") from None
    except _PIL_ERRORS as err:
        raise InputError(f"cannot read {path} as an image: {err}") from None
    with image:
        check_image_size(*image.size, what=str(path))
        try:
            image.load()
            return ImageOps.exif_transpose(image)
        except _PIL_ERRORS as err:
            raise InputError(f"cannot read {path} as an image: {err}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL mode: palette/alpha modes drop alpha, 16/32-bit and float greys are rescaled.

    NaN or infinite values (float images) and modes Pillow cannot convert raise ValueError.
    """
    if image.mode == "RGB":
        return image
    try:
        if not (image.mode.startswith("I") or image.mode == "F"):
            return (image.convert("RGBA") if image.mode == "P" else image).convert("RGB")
        values = np.asarray(image, dtype=np.float64)
    except _PIL_ERRORS as err:
        raise InputError(f"cannot convert a PIL image of mode {image.mode!r} to RGB: {err}") from None
    if not np.isfinite(values).all():
        raise InputError(f"a PIL image of mode {image.mode!r} holds NaN or infinite values")
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")


def _resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def _crop_then_resize(image: Image.Image, resized: tuple[int, int], offset: tuple[int, int], size: int) -> Image.Image:
    """The ``size x size`` crop at ``offset`` of ``image`` resized to ``resized``, resampling only the source window
    behind it (plus the bicubic filter's reach): memory and time stay ``O(size^2)`` whatever the aspect ratio.
    Equal to resizing first up to 8-bit rounding (Pillow may order its two passes differently on the window)."""
    (width, height), (new_width, new_height), (left, top) = image.size, resized, offset
    scale_x, scale_y = width / new_width, height / new_height
    reach_x, reach_y = 2 * max(scale_x, 1.0) + 2, 2 * max(scale_y, 1.0) + 2  # bicubic support, plus rounding
    x0, y0 = max(0, math.floor(left * scale_x - reach_x)), max(0, math.floor(top * scale_y - reach_y))
    x1 = min(width, math.ceil((left + size) * scale_x + reach_x))
    y1 = min(height, math.ceil((top + size) * scale_y + reach_y))
    box = (left * scale_x - x0, top * scale_y - y0, (left + size) * scale_x - x0, (top + size) * scale_y - y0)
    return image.crop((x0, y0, x1, y1)).resize((size, size), Image.BICUBIC, box=box)


def pil_to_tensor(image: Image.Image, size: int) -> Tensor:
    """PIL image -> ``[3, size, size]`` float32 in [0, 1], resized and centre-cropped."""
    check_image_size(*image.size, what=f"PIL image ({image.mode})")
    image = to_rgb(image)
    width, height = image.size
    new_height, new_width = _resized_size(height, width, size)
    top, left = _crop_offsets(new_height, new_width, size)
    if max(new_height, new_width) > CROP_FIRST_ASPECT * size:
        image = _crop_then_resize(image, (new_width, new_height), (left, top), size)
    else:
        if (new_height, new_width) != (height, width):
            image = image.resize((new_width, new_height), Image.BICUBIC)
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32) / 255


def tensor_to_model_size(pixels: Tensor, size: int) -> Tensor:
    """``[N, 3, H, W]`` float in [0, 1] -> ``[N, 3, size, size]``: same resize/crop rule on tensors."""
    height, width = pixels.shape[-2:]
    new_height, new_width = _resized_size(height, width, size)
    if (new_height, new_width) != (height, width):
        pixels = F.interpolate(pixels, size=(new_height, new_width), mode="bicubic", antialias=True,
                               align_corners=False).clamp_(0, 1)
    top, left = _crop_offsets(new_height, new_width, size)
    return pixels[..., top : top + size, left : left + size]


def _tensor_input(value: Tensor) -> Tensor:
    if value.dtype != torch.uint8 and not value.is_floating_point():
        raise InputError(f"image tensors must be float in [0, 1] or uint8, got dtype {value.dtype}")
    if value.dim() == 3:
        value = value[None]
    if value.dim() != 4 or value.shape[1] not in (1, 3) or value.shape[-1] == 0 or value.shape[-2] == 0:
        raise InputError(f"image tensors must be 3xHxW or Nx3xHxW (channels first), got shape {tuple(value.shape)}")
    if value.shape[0] == 0:
        raise InputError(f"image tensor batch of shape {tuple(value.shape)} holds no images")
    check_image_size(value.shape[-1], value.shape[-2], what=f"image tensor of shape {tuple(value.shape)}")
    if value.dtype == torch.uint8:
        value = value.to(torch.float32) / 255
    value = value.detach().to("cpu", torch.float32)
    if value.numel() and (torch.isnan(value).any() or value.min() < 0 or value.max() > 1):
        raise InputError(f"float image tensors must hold values in [0, 1], got range "
                         f"[{value.min().item():.4g}, {value.max().item():.4g}] (divide uint8 data by 255)")
    return value.expand(-1, 3, -1, -1) if value.shape[1] == 1 else value


def _array_input(value: np.ndarray) -> Image.Image:
    if value.dtype != np.uint8:
        raise InputError(f"numpy images must be uint8 HxWxC or HxW arrays, got dtype {value.dtype} "
                         "(pass float data as a torch tensor in [0, 1])")
    if value.ndim == 3 and value.shape[2] == 1:
        value = value[..., 0]
    if not (value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (3, 4))) or 0 in value.shape:
        raise InputError(f"numpy images must be HxW, HxWx1, HxWx3 or HxWx4 uint8 arrays, got shape {value.shape}")
    check_image_size(value.shape[1], value.shape[0], what=f"numpy image of shape {value.shape}")
    return Image.fromarray(np.ascontiguousarray(value))


def load_images(images: ImageInput | Sequence[ImageInput], size: int) -> Tensor:
    """Any accepted input (see ``ACCEPTED``) -> ``[N, 3, size, size]`` float32 in [0, 1] on the CPU."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise InputError(f"no images given; accepted: {ACCEPTED}")
    batches = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            batches.append(pil_to_tensor(open_image(item), size)[None])
        elif isinstance(item, Image.Image):
            batches.append(pil_to_tensor(item, size)[None])
        elif isinstance(item, np.ndarray):
            batches.append(pil_to_tensor(_array_input(item), size)[None])
        elif isinstance(item, Tensor):
            batches.append(tensor_to_model_size(_tensor_input(item), size))
        else:
            raise InputTypeError(f"unsupported image input of type {type(item).__name__}; accepted: {ACCEPTED}")
    return torch.cat(batches)


def _single(value: object) -> bool:
    return isinstance(value, (str, bytes, os.PathLike, Image.Image, np.ndarray, Tensor))


def _chunks(images: ImageInput | Iterable[ImageInput], batch_size: int) -> Iterator[list[ImageInput]]:
    """The inputs in lists of ``batch_size`` images (the last may be shorter), consumed lazily; an ``Nx3xHxW``
    tensor counts ``N`` images and is sliced, not copied."""
    if _single(images):
        items: Iterable[ImageInput] = [images]  # type: ignore[list-item]
    else:
        try:
            items = iter(images)  # type: ignore[arg-type]
        except TypeError:
            raise InputTypeError(f"unsupported image input of type {type(images).__name__}; "
                                 f"accepted: {ACCEPTED}") from None
    chunk: list[ImageInput] = []
    count = 0
    for item in items:
        if isinstance(item, Tensor) and item.dim() == 4 and len(item):
            start = 0
            while start < len(item):  # a batch tensor: slices that fill the chunks
                take = min(batch_size - count, len(item) - start)
                chunk.append(item[start : start + take])
                count, start = count + take, start + take
                if count == batch_size:
                    yield chunk
                    chunk, count = [], 0
            continue
        chunk.append(item)
        count += 1
        if count == batch_size:
            yield chunk
            chunk, count = [], 0
    if chunk:
        yield chunk


def iter_image_batches(images: ImageInput | Iterable[ImageInput], size: int, batch_size: int) -> Iterator[Tensor]:
    """:func:`load_images` batch by batch: ``[n <= batch_size, 3, size, size]`` tensors, the inputs read lazily (a
    list, a generator, any iterable, or one input) while a background thread decodes the next batch. Memory holds
    two batches of images, whatever the number of inputs; ValueError when there is no image at all."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    with ThreadPoolExecutor(1, thread_name_prefix="image-decode") as pool:
        pending: Future | None = None
        for chunk in _chunks(images, batch_size):  # the user's iterable is read on this thread only
            upcoming = pool.submit(load_images, chunk, size)
            if pending is not None:
                yield pending.result()
            pending = upcoming
        if pending is None:
            raise InputError(f"no images given; accepted: {ACCEPTED}")
        yield pending.result()


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder`` (by suffix), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def to_pil(pixels: Tensor) -> Image.Image:
    """``[3, H, W]`` float (clamped to [0, 1]) -> RGB PIL image."""
    array = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def labelled_strip(panels: Sequence[Image.Image], labels: Sequence[str]) -> Image.Image:
    """Panels side by side (no gaps), each with its label centred in a white band below it."""
    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox("Ag0")
    band = (bottom - top) + 8
    width, height = sum(p.width for p in panels), max(p.height for p in panels)
    strip = Image.new("RGB", (width, height + band), "white")
    draw = ImageDraw.Draw(strip)
    x = 0
    for panel, label in zip(panels, labels, strict=True):
        strip.paste(panel.convert("RGB"), (x, 0))
        text_width = draw.textlength(label, font=font)
        draw.text((x + (panel.width - text_width) / 2, height + 4 - top), label, fill="black", font=font)
        x += panel.width
    return strip
