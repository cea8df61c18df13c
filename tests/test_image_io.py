"""Image loading: every PIL mode to RGB, the authors' resize + centre-crop rule, EXIF orientation, folders."""

import numpy as np
import pytest
import torch
from PIL import Image

from adaptive_tokenizer.image_io import list_image_files, load_images, open_image, pil_to_tensor, to_pil


def random_rgb(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width,height", [(600, 300), (300, 600), (256, 256), (100, 80)])
def test_shorter_side_resize_then_centre_crop(width, height):
    image = random_rgb(width, height)
    out = pil_to_tensor(image, 256)
    assert out.shape == (3, 256, 256) and out.dtype == torch.float32
    short, long = min(width, height), max(width, height)
    new_long = int(256 * long / short)
    size = (new_long, 256) if width >= height else (256, new_long)
    expected = image if (width, height) == size else image.resize(size, Image.BICUBIC)
    offset = round((new_long - 256) / 2)
    box = (offset, 0, offset + 256, 256) if width >= height else (0, offset, 256, offset + 256)
    expected = torch.from_numpy(np.array(expected.crop(box))).permute(2, 0, 1).float() / 255
    assert torch.equal(out, expected)


def test_uint8_division_is_exact():
    image = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(16, 0).repeat(16, 1))
    out = pil_to_tensor(image, 256)
    values = torch.arange(256, dtype=torch.float32) / 255
    assert torch.equal(torch.unique(out), values)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    base = random_rgb(64, 48)
    if mode == "I;16":
        image = Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 257))
    elif mode == "I":
        image = Image.fromarray(np.asarray(base.convert("L")).astype(np.int32) * 257)
    elif mode == "F":
        image = Image.fromarray(np.asarray(base.convert("L")).astype(np.float32) / 255)
    else:
        image = base.convert(mode)
    out = pil_to_tensor(image, 32)
    assert out.shape == (3, 32, 32) and 0 <= out.min() and out.max() <= 1
    if mode in ("L", "LA", "I;16", "I", "F"):
        grey = pil_to_tensor(base.convert("L"), 32)
        assert torch.equal(out, grey), mode  # high-bit-depth greys are rescaled to the same 8-bit values


def test_palette_with_transparency():
    image = Image.new("P", (20, 20))
    image.putpalette([255, 0, 0] * 256)
    image.info["transparency"] = 0
    out = pil_to_tensor(image, 20)
    assert out[0].min() == 1 and out[1:].max() == 0


def test_exif_orientation_is_applied(tmp_path):
    image = random_rgb(64, 32)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (32, 64)


def test_tensor_inputs_follow_the_same_rule():
    image = random_rgb(300, 200, seed=3)
    array = np.array(image)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    from_tensor = load_images(tensor, 128)
    from_pil = load_images(image, 128)
    assert from_tensor.shape == from_pil.shape == (1, 3, 128, 128)
    # torch's and PIL's antialiased bicubic kernels differ slightly; on noise images the mean gap stays small.
    assert (from_tensor - from_pil).abs().mean() < 0.02
    assert torch.equal(load_images(tensor[:, :128, :128], 128)[0], tensor[:, :128, :128])


def test_list_image_files(tmp_path):
    for name in ("b.png", "a.JPG", "notes.txt", "c.webp"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in list_image_files(tmp_path)] == ["a.JPG", "b.png", "c.webp"]
    with pytest.raises(FileNotFoundError):
        list_image_files(tmp_path / "missing")


def test_to_pil_clamps():
    image = to_pil(torch.tensor([[[-1.0, 2.0]]]).expand(3, 1, 2))
    assert np.asarray(image).tolist() == [[[0, 0, 0], [255, 255, 255]]]
