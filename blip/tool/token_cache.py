"""Image tokens computed once: training with a frozen ViT (train.py --freeze-vision --cache-image-tokens).

A frozen ViT turns the same pixels into the same tokens every epoch, so an epoch need not run it:
each picture's tokens are computed once per view and read back from disk (as frozen-encoder captioners
do: ClipCap, SmallCap). What it costs is the augmentation: only a transform with a fixed set of pictures
per image can be cached (TrainTransform.views: "none" one, "flip" two, as it is and mirrored), not
random crops. The decoder then does all the work of a step: at base size about 70 GFLOP per sample
against 400 for the full fine-tune (BLIP_NOTES.md).

    OUT/image_tokens/tokens.npy   float32 (images * views, N, C), memory-mapped: epochs read the page cache
    OUT/image_tokens/key.json     what the tokens were made from: the ViT's weights, the images, the views,
                                  the precision they were computed in (fp32, or bf16/fp16 autocast)

A resumed run with the same key reuses the file; anything else rebuilds it. The key is written last,
so a run killed while building leaves no file that looks finished. The file's size is known before the
first picture (1.8 MB a view at base size: 577 x 768 float32) and its space is taken on the disk at once,
so a disk too small is a one-line error, not a crash half-way. Several processes (torchrun) each compute
a share of the views into the one file.

float32 keeps the tokens the ViT made, so a cached run equals an uncached one (losses to 2e-5, weights to
1e-5, tested). float16 would halve the file, and rounding the tokens to it moved the loss of a trained tiny
model on 64 pictures by only 3e-6 relative (of a base-size one, random weights, batch 4: 1e-7); but AdamW
scales every weight's step by its own gradient's size, so the rarely moved weights amplify that rounding:
after 6 steps at lr 2e-3 weights differed by more than 1e-5, and the cache stays exact in float32.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

TOKENS, KEY = "tokens.npy", "key.json"


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's tensors (names, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def image_id(row) -> str:
    """What identifies one training image: its file (path, size, modification time) or its bytes."""
    if row.data is not None:
        return hashlib.sha1(row.data).hexdigest()
    st = row.image.stat()
    return f"{row.image.resolve()}:{st.st_size}:{st.st_mtime_ns}"


class CacheError(ValueError):
    """A cache of image tokens that cannot be made (no room on the disk); one line, for the user."""


def key_of(vit, rows, transform, precision: str) -> dict:
    """What the tokens are made from; a cache whose key.json says anything else is made again."""
    return {"vit_sha256": weights_hash(vit), "views": transform.views, "image_size": transform.size,
            "precision": precision, "images": [image_id(row) for row in rows]}


class ImageTokens:
    """(B,) view indices -> (B, N, C) image tokens, from the memory-mapped file."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens  # (images * views, N, C)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.tokens[index.numpy()])  # a copy of those rows, (B, N, C)

    @classmethod
    def open(cls, folder, key: dict) -> "ImageTokens | None":
        """The finished cache in `folder` made from `key`, or None."""
        folder = Path(folder)
        if (folder / KEY).is_file() and json.loads((folder / KEY).read_text()) == key:
            return cls(np.load(folder / TOKENS, mmap_mode="r"))
        return None

    @staticmethod
    def create(folder, shape: tuple[int, int, int]) -> str:
        """Make an empty cache file of `shape` in `folder`, its space taken on the disk now. Returns its size in
        words; CacheError when the disk has no room for it."""
        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        size = int(np.prod(shape)) * 4
        free = shutil.disk_usage(folder).free
        what = f"{shape[0]} views x {shape[1]} x {shape[2]} float32 = {size / 1e9:.2f} GB in {folder}"
        if size > free:
            shutil.rmtree(folder)
            raise CacheError(f"the image tokens need {what}, and the disk has {free / 1e9:.2f} GB free: free some, or "
                             "give --out on another disk")
        tokens = np.lib.format.open_memmap(folder / TOKENS, mode="w+", dtype=np.float32, shape=shape)
        del tokens
        try:
            with open(folder / TOKENS, "r+b") as f:  # real blocks now: a full disk is an error here, not a SIGBUS
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            shutil.rmtree(folder)
            raise CacheError(f"the image tokens need {what}: {e.strerror}") from None
        return what

    @staticmethod
    def fill(folder, views: range, vit, rows, transform, batch: int, autocast, progress=None):
        """Compute the tokens of `views` (indices into images * views: row i's view v is i * views + v) into
        the file `create` made; several processes may fill different views of it at once."""
        tokens = np.load(Path(folder) / TOKENS, mmap_mode="r+")
        device = next(vit.parameters()).device
        was_training = vit.training
        vit.eval()
        with torch.no_grad():
            for start in range(views.start, views.stop, batch):
                chunk = [divmod(k, transform.views) for k in range(start, min(start + batch, views.stop))]
                images = {i: rows[i].load() for i in dict.fromkeys(i for i, _ in chunk)}  # each image read once
                pixels = torch.stack([transform.view_pixels(images[i], v) for i, v in chunk]).to(device)
                with autocast():
                    out = vit(pixels)  # (b, N, C)
                tokens[start : start + len(chunk)] = out.float().cpu().numpy()
                if progress is not None:
                    progress.update(len(chunk))
        vit.train(was_training)
        tokens.flush()

    @staticmethod
    def finish(folder, key: dict):
        """Mark the cache finished: its contents on disk, then its key."""
        folder = Path(folder)
        with open(folder / TOKENS, "rb") as f:
            os.fsync(f.fileno())
        (folder / KEY).write_text(json.dumps(key) + "\n")
