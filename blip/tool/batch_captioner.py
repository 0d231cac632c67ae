"""The captioner as a callable class over batches of rows, for engines that run a model per worker: Ray Data's
`Dataset.map_batches` makes one per actor (the model is loaded once, on that actor's CPU or GPU) and calls
it on each batch. caption_ray.py is the script that uses it; nothing here imports Ray.

    ds = ray.data.read_webdataset(shards, decoder=None)   # raw bytes: {"__key__", "jpg", ...}
    ds = ds.map_batches(BatchCaptioner, fn_constructor_kwargs={"checkpoint": "checkpoints/blip-base"},
                        batch_size=16, batch_format="numpy", concurrency=4, num_gpus=1)
    ds.write_parquet("captions/")                          # key, caption, error

Rows are read as shards.key_and_image reads a shard's rows: the image bytes from `image` ({bytes, path})
or `jpg`/`jpeg`/`png`/`webp`, the key from `__key__` (webdataset) or `key`. Captions are caption.py's for
the same settings: the same eval transform, decoding and prompt.
"""

import pyarrow as pa
import torch

from blip.decoding import changed
from blip.tool.caption_shards import sample_pixels
from blip.tool.captioner import Captioner
from blip.tool.shards import key_and_image

SCHEMA = pa.schema({"key": pa.string(), "caption": pa.string(), "error": pa.string()})


class BatchCaptioner:
    """BatchCaptioner(checkpoint, device, dtype, prompt, **decoding) -> callable on {column: (B,) array} batches,
    returning a table of key, caption, error: a caption (or None) and why not (or None) per row."""

    def __init__(self, checkpoint: str, device: str = "auto", dtype: str = "auto", prompt: str | None = None,
                 **decoding):
        self.captioner = Captioner.from_pretrained(checkpoint, device, dtype)
        self.prompt = self.captioner.prompt if prompt is None else prompt
        self.config = changed(self.captioner.defaults, **decoding)  # num_beams, max_new_tokens, ... as HF names them
        self.config.validate()

    def __call__(self, batch: dict) -> pa.Table:
        columns = list(batch)
        n = len(batch[columns[0]])
        keys, pixels, errors = [], [], []
        for i in range(n):
            key, data = key_and_image({c: batch[c][i] for c in columns}, i)
            image, error = sample_pixels(key, data, self.captioner.image_size)
            keys.append(key)
            pixels.append(image)
            errors.append(error)
        good = [i for i in range(n) if pixels[i] is not None]
        captions = [None] * n
        if good:
            tokens = self.captioner.encode(torch.stack([pixels[i] for i in good]))  # (B, N, C)
            texts = self.captioner.caption(tokens, self.prompt, self.config)
            for i, text in zip(good, texts, strict=True):
                if text.strip():
                    captions[i] = text
                else:
                    errors[i] = f"{keys[i]}: the model wrote an empty caption"
        # typed columns: a batch without errors is still a string column, so the files read back as one table
        return pa.table({"key": keys, "caption": captions, "error": errors}, schema=SCHEMA)
