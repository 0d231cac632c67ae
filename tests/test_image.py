"""Image loading and the eval transform: equal to HF BlipImageProcessor on real photographs and
on every odd mode a user may have; EXIF rotation applied; unreadable files are clear errors."""

from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image
from transformers import BlipImageProcessor

from blip.image import ImageError, eval_transform, load_image

PHOTOS = Path(skimage.__file__).parent / "data"  # real photographs shipped with scikit-image
PHOTO_FILES = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg",
               "motorcycle_left.png", "camera.png", "no_time_for_that_tiny.gif", "logo.png"]


def hf_pixels(image: Image.Image, size: int = 384) -> np.ndarray:
    processor = BlipImageProcessor(size={"height": size, "width": size})
    return processor(images=image, return_tensors="pt")["pixel_values"][0].numpy()


def max_diff(path_or_image, size: int = 384, hf_input=None) -> float:
    ours = eval_transform(load_image(path_or_image) if isinstance(path_or_image, Path) else path_or_image, size)
    ref = hf_pixels(hf_input if hf_input is not None else Image.open(path_or_image), size)
    assert ours.shape == ref.shape == (3, size, size)
    return float(np.abs(ours.numpy() - ref).max())


@pytest.mark.parametrize("name", PHOTO_FILES)
def test_photographs_match_hf_processor(name):
    assert max_diff(PHOTOS / name) <= 1e-6


@pytest.mark.parametrize("size", [64, 224, 480])
def test_other_sizes_match_hf_processor(size):
    assert max_diff(PHOTOS / "chelsea.png", size) <= 1e-6


def odd_files(folder: Path) -> dict[str, Path]:
    """The same photograph saved in the modes and formats users meet."""
    photo = Image.open(PHOTOS / "chelsea.png").convert("RGB")
    alpha = Image.linear_gradient("L").resize(photo.size)
    files = {
        "L.png": photo.convert("L"),
        "1.png": photo.convert("1"),
        "P.png": photo.convert("P", palette=Image.Palette.ADAPTIVE),
        "RGBA.png": Image.merge("RGBA", (*photo.split(), alpha)),
        "LA.png": Image.merge("LA", (photo.convert("L"), alpha)),
        "CMYK.jpg": photo.convert("CMYK"),
        "RGB.webp": photo,
        "RGBA.webp": Image.merge("RGBA", (*photo.split(), alpha)),
        "RGB.bmp": photo,
        "RGB.tiff": photo,
    }
    paths = {}
    for name, im in files.items():
        paths[name] = folder / name
        im.save(paths[name])
    p = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    p.info["transparency"] = 0  # palette entry 0 is transparent
    paths["P-transparent.png"] = folder / "P-transparent.png"
    p.save(paths["P-transparent.png"], transparency=0)
    return paths


def test_odd_modes_match_hf_processor(tmp_path):
    for name, path in odd_files(tmp_path).items():
        assert load_image(path).mode == "RGB", name
        assert max_diff(path) <= 1e-6, name


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    gray = np.asarray(Image.open(PHOTOS / "camera.png"), dtype=np.uint16) * 257  # 0..65535
    path = tmp_path / "deep.png"
    Image.fromarray(gray).save(path)
    assert Image.open(path).mode.startswith("I")
    loaded = np.asarray(load_image(path))
    expected = np.asarray(Image.open(PHOTOS / "camera.png").convert("RGB"))
    assert np.array_equal(loaded, expected)  # 16-bit values back on the 8-bit scale
    assert max_diff(load_image(path), hf_input=load_image(path)) <= 1e-6


def test_exif_orientation_is_applied(tmp_path):
    photo = Image.open(PHOTOS / "chelsea.png").convert("RGB")  # 451 wide, 300 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    photo.save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.size == (300, 451)
    raw = Image.open(path).convert("RGB")
    assert np.array_equal(np.asarray(loaded), np.asarray(raw.transpose(Image.Transpose.ROTATE_270)))


def test_unreadable_files_are_clear_errors(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    data = (PHOTOS / "rocket.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    cases = {
        tmp_path / "missing.png": "no such file",
        tmp_path / "notes.jpg": "not an image",
        tmp_path / "cut.jpg": "cannot read image",
        tmp_path: "is a folder",
    }
    for path, message in cases.items():
        with pytest.raises(ImageError, match=message) as e:
            load_image(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
