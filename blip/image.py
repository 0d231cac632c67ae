"""Images: loading whatever a user has as RGB, and the transforms BLIP's captioner expects.

The eval transform is HF `BlipImageProcessor`'s, step for step (bicubic antialiased resize of the
uint8 image to the model's square size, then rescale and normalise with CLIP's statistics in one
fused step), so pixel values agree with it to float rounding.

The train transform is BLIP's fine-tuning augmentation (configs/caption_coco.yaml): a random
resized crop, a horizontal flip, and RandAugment restricted to ops that keep a caption true.
"""

import io
import random
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.nn import functional as F

# CLIP's normalisation statistics, which BLIP and HF's BlipImageProcessor use
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# rescale (1/255) and normalise fused into one step, as HF does (its float32 products)
MEAN_255 = (torch.tensor(CLIP_MEAN) * 255).view(3, 1, 1)
STD_255 = (torch.tensor(CLIP_STD) * 255).view(3, 1, 1)
HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16/32-bit single-channel modes
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}  # what folders are searched for


class ImageError(ValueError):
    """An image that cannot be read; the message names the file and the reason."""


def load_image(path, data: bytes | None = None) -> Image.Image:
    """Open an image file (or its bytes `data`, named `path` in errors) as an upright 8-bit RGB image.

    EXIF orientation is applied; animations give their first frame; transparency is composited
    onto white (as HF's processor does); 16-bit images are scaled to 8 bits, not clipped.
    """
    path = Path(path)
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            im.seek(0)
            return to_rgb(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (or a format Pillow cannot read)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot read image ({str(e).strip() or type(e).__name__})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (8 bits per channel)."""
    if im.mode in HIGH_DEPTH:
        a = np.asarray(im, dtype=np.float64)
        if im.mode != "F":
            a = a / 257.0  # 0..65535 -> 0..255
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # mode L
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")  # no copy of an image already RGB (load_image's)


def eval_transform(im: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> (3, size, size) float32, as HF BlipImageProcessor computes it."""
    x = torch.from_numpy(np.array(to_rgb(im))).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    # antialiased bicubic resize of the uint8 image, to uint8 (torchvision's resize, without importing it:
    # captioning starts a second sooner)
    if x.shape[1:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    return (x.float() - MEAN_255) / STD_255


def preprocess(images, size: int) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) pixel values."""
    return torch.stack([eval_transform(im, size) for im in images])


# --- training ---------------------------------------------------------------------------------
# BLIP's RandomAugment list, less its Identity (each op already applies with probability 0.5):
# geometry and contrast, no op that changes hue (captions name colours: no Color, Invert,
# Solarize, Posterize). At magnitude 5 timm's Brightness and Sharpness are the identity, as in BLIP.
RAND_OPS = ["AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX", "ShearY",
            "TranslateXRel", "TranslateYRel", "Rotate"]
FLIP_WORDS = {"left": "right", "right": "left"}


def flip_caption(caption: str) -> str:
    """The caption of the mirrored picture: "left" and "right" trade places."""
    return re.sub(r"\b(left|right)\b", lambda m: FLIP_WORDS[m.group(1)], caption)


@contextmanager
def seeded(seed: int):
    """Run a block on Python's, NumPy's and torch's global random streams seeded with `seed`
    (timm and torchvision draw from them), then give the streams back as they were."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


class TrainTransform:
    """(RGB image, caption, seed) -> ((3, size, size) pixels, caption), the same output for the
    same seed, whatever process or worker runs it (resuming and multi-process training rely on it).

    augment: "blip" = random resized crop (scale 0.5-1, bicubic), flip, RandAugment (2 ops,
    magnitude 5); "flip" = flips only; "none" = the eval transform."""

    def __init__(self, size: int, augment: str = "blip", magnitude: int = 5, scale: tuple[float, float] = (0.5, 1.0)):
        from timm.data.auto_augment import RandAugment, rand_augment_ops
        from torchvision.transforms import InterpolationMode, RandomResizedCrop

        if augment not in ("blip", "flip", "none"):
            raise ValueError(f"unknown augmentation {augment!r}")
        self.size, self.augment = size, augment
        self.crop = RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC)
        # BLIP translates by 5 pixels of 384 at magnitude 5: the same fraction at any image size
        fill = tuple(round(m * 255) for m in CLIP_MEAN)
        hparams = {"translate_pct": 2 * 5 / 384, "img_mean": fill}
        self.rand_augment = RandAugment(rand_augment_ops(magnitude, hparams=hparams, transforms=RAND_OPS), num_layers=2)

    @property
    def views(self) -> int | None:
        """How many distinct pictures the transform makes of one image: 1 (none), 2 (flip: as it is or
        mirrored), None for "blip" (random crops: too many to compute ahead, train.py's cached image tokens)."""
        return {"none": 1, "flip": 2}.get(self.augment)

    def view(self, seed: int) -> int:
        """Which of the `views` the sample of `seed` gets: 1 when mirrored, else 0 (not for "blip")."""
        if self.augment == "blip":
            raise ValueError("random crops give no fixed views")
        return int(self.augment == "flip" and random.Random(seed).random() < 0.5)  # the draw seeded(seed) makes

    def __call__(self, im: Image.Image, caption: str, seed: int) -> tuple[torch.Tensor, str]:
        if self.augment != "blip":
            view = self.view(seed)
            return self.view_pixels(im, view), flip_caption(caption) if view else caption
        im = to_rgb(im)
        with seeded(seed):
            im = self.crop(im)
            if random.random() < 0.5:
                im, caption = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), flip_caption(caption)
            im = self.rand_augment(im)
        return eval_transform(im, self.size), caption

    def view_pixels(self, im: Image.Image, view: int) -> torch.Tensor:
        """(3, size, size) pixels of one of the `views`: 0 the picture as it is, 1 mirrored."""
        im = to_rgb(im)
        return eval_transform(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if view else im, self.size)
