"""caption.py on shards (blip/tool/shards.py): each shard streamed through the model, its captions written to
its own output once the whole shard is captioned.

A worker process reads and resizes the samples while the model captions the batch before; each shard's
samples are followed by a marker, so that the loop knows when a shard is whole and writes its output. A kill
loses only the shards in flight: their outputs were never written, and the rerun does them again.
"""

import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from blip.image import ImageError, eval_transform, load_image
from blip.tool.captioner import rerank
from blip.tool.shards import ShardError, samples, write_output


@dataclass
class Item:
    """What the reader yields: a sample (its pixels, or why it has none) or the end of a shard."""

    shard: int
    key: str | None = None  # None: the end of shard `shard`
    pixels: torch.Tensor | None = None
    error: str | None = None  # a bad sample, or (at the end) a shard that could not be read on
    data: bytes | None = None  # the image bytes, kept for --rerank's matching model


class ShardSamples(torch.utils.data.IterableDataset):
    """Shards -> Items, a worker process taking every n-th shard (whole shards, so each shard's end comes
    after all its samples)."""

    def __init__(self, shards: list, size: int, keep_bytes: bool = False):
        self.shards, self.size, self.keep_bytes = shards, size, keep_bytes

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = range(len(self.shards))[info.id :: info.num_workers] if info else range(len(self.shards))
        for i in mine:
            try:
                for key, data in samples(self.shards[i]):
                    yield self.sample(i, key, data)
            except ShardError as e:
                yield Item(i, error=str(e))
                continue
            yield Item(i)

    def sample(self, i: int, key: str, data: bytes | None) -> Item:
        pixels, error = sample_pixels(f"{self.shards[i]}/{key}", data, self.size)
        return Item(i, key, pixels, error, data if self.keep_bytes and error is None else None)


def sample_pixels(name: str, data: bytes | None, size: int) -> tuple[torch.Tensor | None, str | None]:
    """A sample's image bytes -> ((3, size, size) pixels, None), or (None, why not) named by `name`."""
    if data is None:
        return None, f"{name}: no image in this sample"
    try:
        return eval_transform(load_image(name, data), size), None
    except ImageError as e:
        return None, str(e)


def caption_shards(args, todo: list, captioner, matcher, workers: int, master: bool) -> int:
    """Caption the shards of `todo` [(shard, output path)] and write each one's output; returns how many
    samples and shards failed (each named on stderr; a bad sample also in its shard's output)."""
    records = {}  # shard number -> its records so far, until its end is seen
    failed = pictures = 0
    generator = captioner.generator(args.seed)
    loader = torch.utils.data.DataLoader(ShardSamples([s for s, _ in todo], captioner.image_size, matcher is not None),
                                         batch_size=args.batch_size, num_workers=workers, collate_fn=list)
    with tqdm(total=len(todo), unit="shard", disable=not master, file=sys.stderr, dynamic_ncols=True) as bar:
        for batch in loader:
            good = [item for item in batch if item.pixels is not None]
            captions = caption_batch(captioner, matcher, good, args, generator) if good else []
            for item in batch:
                if item.key is None:
                    continue
                text = captions.pop(0) if item.pixels is not None else None
                if item.error is None and not text[0]:  # caption_batch gives "" for an empty caption
                    item.error = f"{todo[item.shard][0]}/{item.key}: the model wrote an empty caption"
                if item.error is not None:
                    tqdm.write(f"error: {item.error}", file=sys.stderr)
                    failed += 1
                    records.setdefault(item.shard, []).append({"key": item.key, "error": item.error})
                else:
                    records.setdefault(item.shard, []).append({"key": item.key, "caption": text[0],
                                                               **({} if text[1] is None else {"score": text[1]})})
            for item in batch:
                if item.key is not None:
                    continue
                done = records.pop(item.shard, [])
                if item.error is not None:  # not written: the rerun tries the shard again
                    tqdm.write(f"error: {item.error}; its output is not written", file=sys.stderr)
                    failed += 1
                else:
                    shard, out = todo[item.shard]
                    write_output(out, done, out.suffix[1:], scored=matcher is not None)
                pictures += len(done)
                bar.update()
                bar.set_postfix(pictures=pictures)
    return failed


def caption_batch(captioner, matcher, batch: list, args, generator) -> list[tuple[str, float | None]]:
    """(caption with --prefix/--suffix, --rerank's score or None) of each Item of one batch."""
    tokens = captioner.encode(torch.stack([item.pixels for item in batch]))
    captions = captioner.caption(tokens, args.prompt, args.decode, generator)
    out = []
    for i, (item, caption) in enumerate(zip(batch, captions, strict=True)):
        score = None
        if matcher is not None:
            image = load_image(item.key, item.data)
            caption, score = rerank(captioner, matcher, image, tokens[i : i + 1], caption, args.prompt, args.sampling,
                                    args.candidates, generator)
        out.append((f"{args.prefix}{caption}{args.suffix}" if caption.strip() else "", score))
    return out
