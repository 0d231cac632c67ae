"""Images: loading whatever a user has as RGB, and the transform BLIP's captioner expects.

The eval transform is HF `BlipImageProcessor`'s, step for step (bicubic antialiased resize of the
uint8 image to the model's square size, then rescale and normalise with CLIP's statistics in one
fused step), so pixel values agree with it to float rounding.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

# CLIP's normalisation statistics, which BLIP and HF's BlipImageProcessor use
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# rescale (1/255) and normalise fused into one step, as HF does (its float32 products)
MEAN_255 = (torch.tensor(CLIP_MEAN) * 255).tolist()
STD_255 = (torch.tensor(CLIP_STD) * 255).tolist()
HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16/32-bit single-channel modes


class ImageError(ValueError):
    """An image that cannot be read; the message names the file and the reason."""


def load_image(path) -> Image.Image:
    """Open an image file as an upright 8-bit RGB image.

    EXIF orientation is applied; animations give their first frame; transparency is composited
    onto white (as HF's processor does); 16-bit images are scaled to 8 bits, not clipped.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
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
    x = tvF.resize(x, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return tvF.normalize(x.float(), MEAN_255, STD_255)


def preprocess(images, size: int) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) pixel values."""
    return torch.stack([eval_transform(im, size) for im in images])
