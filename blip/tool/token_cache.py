"""Image tokens computed once: training with a frozen ViT (train.py --freeze-vision --cache-image-tokens).

A frozen ViT turns the same pixels into the same tokens every epoch, so an epoch need not run it:
each picture's tokens are computed once per view and read back from disk (as frozen-encoder captioners
do: ClipCap, SmallCap). What it costs is the augmentation: only a transform with a fixed set of pictures
per image can be cached (TrainTransform.views: "none" one, "flip" two, as it is and mirrored), not
random crops. The decoder then does all the work of a step: at base size about 70 GFLOP per sample
against 400 for the full fine-tune (BLIP_NOTES.md).

    OUT/image_tokens/tokens.npy   float32 (images * views, N, C), memory-mapped: epochs read the page cache
    OUT/image_tokens/key.json     what the tokens were made from: the ViT's weights, the images, the views

A resumed run with the same key reuses the file; anything else rebuilds it. The key is written last,
so a run killed while building leaves no file that looks finished.
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


class ImageTokens:
    """(B,) view indices -> (B, N, C) image tokens, from the memory-mapped file."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens  # (images * views, N, C)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.tokens[index.numpy()])  # a copy of those rows, (B, N, C)

    @classmethod
    def open_or_build(cls, folder, vit, rows, transform, batch: int, autocast, progress=None) -> "ImageTokens":
        """The cache in `folder` for these rows, views and ViT, built first if missing or made from
        anything else. vit: the frozen image encoder (on its device); transform: TrainTransform."""
        folder = Path(folder)
        key = {"vit_sha256": weights_hash(vit), "views": transform.views, "image_size": transform.size,
               "images": [image_id(row) for row in rows]}
        if (folder / KEY).is_file() and json.loads((folder / KEY).read_text()) == key:
            return cls(np.load(folder / TOKENS, mmap_mode="r"))
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        device = next(vit.parameters()).device
        cfg = vit.cfg
        shape = (len(rows) * transform.views, cfg.num_tokens, cfg.width)
        tokens = np.lib.format.open_memmap(folder / TOKENS, mode="w+", dtype=np.float32, shape=shape)
        views = [(i, v) for i in range(len(rows)) for v in range(transform.views)]  # row i's view v is i * views + v
        was_training = vit.training
        vit.eval()
        with torch.no_grad():
            for start in range(0, len(views), batch):
                chunk = views[start : start + batch]
                images = {i: rows[i].load() for i in dict.fromkeys(i for i, _ in chunk)}  # each image read once
                pixels = torch.stack([transform.view_pixels(images[i], v) for i, v in chunk]).to(device)
                with autocast():
                    out = vit(pixels)  # (b, N, C)
                tokens[start : start + len(chunk)] = out.float().cpu().numpy()
                if progress is not None:
                    progress.update(len(chunk))
        vit.train(was_training)
        tokens.flush()
        with open(folder / TOKENS, "rb") as f:
            os.fsync(f.fileno())
        (folder / KEY).write_text(json.dumps(key) + "\n")
        return cls(np.load(folder / TOKENS, mmap_mode="r"))
