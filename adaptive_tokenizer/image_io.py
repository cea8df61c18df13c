"""Image input/output: anything a user may hold -> ``[N, 3, S, S]`` float32 in [0, 1], and back to PNG.

Preprocessing is the authors' evaluation transform: convert to RGB, resize so the shorter side is ``S``
(bicubic, antialiased; the longer side becomes ``int(S * long / short)``), then centre-crop to ``S x S``
(offset ``round((size - S) / 2)``), then ``uint8 / 255``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from torch import Tensor

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, Tensor]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

ACCEPTED = ("a path, a PIL image, an HxWxC or HxW uint8 numpy array, a 3xHxW or Nx3xHxW float tensor in [0, 1] "
            "(or uint8 tensor), or a list of these")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file (EXIF orientation applied), with a clear error for missing or unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read {path} as an image: {err}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL mode: palette/alpha modes drop alpha, 16/32-bit and float greys are rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    elif image.mode == "P":
        image = image.convert("RGBA")
    return image.convert("RGB")


def _resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def pil_to_tensor(image: Image.Image, size: int) -> Tensor:
    """PIL image -> ``[3, size, size]`` float32 in [0, 1], resized and centre-cropped."""
    image = to_rgb(image)
    width, height = image.size
    new_height, new_width = _resized_size(height, width, size)
    if (new_height, new_width) != (height, width):
        image = image.resize((new_width, new_height), Image.BICUBIC)
    top, left = _crop_offsets(new_height, new_width, size)
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
    if value.dtype == torch.uint8:
        value = value.to(torch.float32) / 255
    elif not value.is_floating_point():
        raise ValueError(f"image tensors must be float in [0, 1] or uint8, got dtype {value.dtype}")
    if value.dim() == 3:
        value = value[None]
    if value.dim() != 4 or value.shape[1] not in (1, 3) or value.shape[-1] == 0 or value.shape[-2] == 0:
        raise ValueError(f"image tensors must be 3xHxW or Nx3xHxW (channels first), got shape {tuple(value.shape)}")
    value = value.detach().to("cpu", torch.float32)
    if value.numel() and (torch.isnan(value).any() or value.min() < 0 or value.max() > 1):
        raise ValueError(f"float image tensors must hold values in [0, 1], got range "
                         f"[{value.min().item():.4g}, {value.max().item():.4g}] (divide uint8 data by 255)")
    return value.expand(-1, 3, -1, -1) if value.shape[1] == 1 else value


def _array_input(value: np.ndarray) -> Image.Image:
    if value.dtype != np.uint8:
        raise ValueError(f"numpy images must be uint8 HxWxC or HxW arrays, got dtype {value.dtype} "
                         "(pass float data as a torch tensor in [0, 1])")
    if value.ndim == 3 and value.shape[2] == 1:
        value = value[..., 0]
    if not (value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (3, 4))) or 0 in value.shape:
        raise ValueError(f"numpy images must be HxW, HxWx1, HxWx3 or HxWx4 uint8 arrays, got shape {value.shape}")
    return Image.fromarray(np.ascontiguousarray(value))


def load_images(images: ImageInput | Sequence[ImageInput], size: int) -> Tensor:
    """Any accepted input (see ``ACCEPTED``) -> ``[N, 3, size, size]`` float32 in [0, 1] on the CPU."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError(f"no images given; accepted: {ACCEPTED}")
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
            raise TypeError(f"unsupported image input of type {type(item).__name__}; accepted: {ACCEPTED}")
    return torch.cat(batches)


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
