"""BLIP's filter step (CapFilt): score every (image, caption) pair of a data set with an image-text matching
model, and keep the pairs that match.

    python filter_data.py --data ./football --itm checkpoints/blip-itm-base --out football-filtered

Reads every layout train.py reads (blip/tool/data.py), all splits together. Writes OUT/scores.jsonl (every
pair, its match probability, kept or not) and OUT/metadata.jsonl (the kept pairs, an image folder
train.py takes as --data; images stored as bytes in parquet files are written to OUT/images/), and
says what it dropped.
"""

import argparse
import hashlib
import io
import json
import os
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from blip.checkpoint import CheckpointError
from blip.tool.captioner import Matcher
from blip.tool.data import DataError, Split, check_images, read_splits


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, metavar="DIR", help="data folder, in any layout train.py reads")
    p.add_argument("--itm", required=True, metavar="DIR",
                   help="image-text matching model: a BlipRetrieval folder made by convert_weights.py")
    p.add_argument("--out", metavar="DIR", help="where scores.jsonl and metadata.jsonl go (default: DATA-filtered)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="keep pairs whose match probability is at least this (default: 0.5)")
    p.add_argument("--skip-bad", action="store_true", help="score the readable rows when some are bad, "
                   "instead of stopping")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: a GPU when there is one")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if not 0 <= args.threshold <= 1:
        p.error("--threshold must be in [0, 1]")
    data = Path(args.data).resolve()
    args.out = Path(args.out) if args.out else data.parent / f"{data.name}-filtered"
    out = args.out.resolve()
    if out == data or data in out.parents:
        p.error("--out must be outside --data: the data set's own captions are not overwritten")
    if (args.out / "metadata.jsonl").exists() or (args.out / "scores.jsonl").exists():
        p.error(f"{args.out} already holds a filtered data set; choose another --out")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train, val = read_splits(args.data, val_fraction=0.0)
        matcher = Matcher.from_pretrained(args.itm, args.device)
    except (DataError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows = train.rows + val.rows
    with tqdm(total=len(rows), unit="image", desc="checking images", file=sys.stderr) as bar:
        split = check_images(Split(rows, train.problems + val.problems), bar)
    if split.problems:
        for problem in split.problems:
            print(f"error: {problem}", file=sys.stderr)
        if not args.skip_bad:
            print(f"error: {len(split.problems)} bad row(s) (listed above); fix them, or pass --skip-bad",
                  file=sys.stderr)
            return 1

    args.out.mkdir(parents=True, exist_ok=True)
    kept, dropped = 0, []
    with open(args.out / "scores.jsonl", "w") as scores_file, open(args.out / "metadata.jsonl", "w") as metadata, \
            tqdm(total=len(split.rows), unit="image", desc="scoring", file=sys.stderr) as bar:
        for row in split.rows:
            image = row.load()
            file_name = image_file(row, args.out)
            for caption, score in zip(row.captions, matcher.scores(image, row.captions).tolist(), strict=True):
                score = round(score, 6)  # as written: the decision and the file agree
                keep = score >= args.threshold
                record = {"file_name": file_name, "text": caption}
                scores_file.write(json.dumps({**record, "score": score, "kept": keep}) + "\n")
                if keep:
                    metadata.write(json.dumps(record) + "\n")
                    kept += 1
                else:
                    dropped.append((score, str(row.image), caption))
            bar.update(1)
    total = kept + len(dropped)
    print(f"kept {kept} of {total} pairs (match probability >= {args.threshold}); dropped {len(dropped)}:")
    for score, image, caption in sorted(dropped)[:10]:
        print(f"  {score:.3f}  {image}: {caption}")
    if len(dropped) > 10:
        print(f"  ... and {len(dropped) - 10} more (every score is in {args.out / 'scores.jsonl'})")
    print(f"kept pairs: {args.out / 'metadata.jsonl'} (train.py --data {args.out})")
    return 0


def image_file(row, out: Path) -> str:
    """The row's image as a file_name relative to OUT: the file itself, or its bytes written out."""
    if row.data is None:
        return os.path.relpath(row.image.resolve(), out.resolve())
    with Image.open(io.BytesIO(row.data)) as im:  # named by content: rows of different files never collide
        suffix = {"JPEG": ".jpg"}.get(im.format, f".{(im.format or 'img').lower()}")
    name = f"images/{hashlib.sha1(row.data).hexdigest()}{suffix}"
    (out / "images").mkdir(exist_ok=True)
    (out / name).write_bytes(row.data)
    return name


if __name__ == "__main__":
    sys.exit(main())
