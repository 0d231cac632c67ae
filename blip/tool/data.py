"""Captioning data: the folder layouts people already have, checked before training, split, batched.

Layouts of one folder (the first found wins):
  metadata.jsonl / metadata.csv   `file_name` + `text` (or `caption`): HF's "imagefolder"
  *.json                          COCO captions (`images` + `annotations`), or BLIP's own list of
                                  {"image", "caption"}; several captions per image
  *.parquet (any depth)           an HF `datasets` snapshot: `image` ({bytes, path}) + `text` columns
  photo.jpg + photo.txt           sidecar captions, one per line
Splits: `train/` and `val/` (or `validation/`) sub-folders, or parquet files named `train-*` and
`validation-*`/`val-*`; otherwise a seeded fraction of the images is held out.

Every problem (missing or unreadable image, empty caption, malformed row) is collected with its
file and line, so that a bad data set is reported in full before anything is trained or written.
"""

import csv
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..image import IMAGE_SUFFIXES, ImageError, TrainTransform, eval_transform, flip_caption, load_image

VAL_NAMES = ("val", "validation", "valid")
HANDFUL = 20  # fewer pictures than this, and no --val-fraction: none held out (blip/tool/plan.py)
MAX_WORDS = 30  # BLIP truncates training captions to 30 words


class DataError(ValueError):
    """A data set that cannot be read at all (no captions found, missing reader)."""


@dataclass
class Row:
    """One image and its captions."""

    image: Path  # the image file, or the name of an image whose bytes are in `data`
    captions: list[str]
    where: str  # "file:line", for messages
    data: bytes | None = None  # image bytes from a parquet file

    def load(self) -> Image.Image:
        return load_image(self.image, self.data)


@dataclass
class Split:
    """The rows of one split, and what was wrong with the rest."""

    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def clean_caption(text: str, max_words: int | None = None) -> str:
    """BLIP's pre_caption: lower case, its punctuation to spaces, spaces collapsed, words capped."""
    text = re.sub(r"[.!\"()*#:;~]", " ", text.lower())
    words = text.split()
    return " ".join(words[:max_words] if max_words else words)


# --- reading one folder ---------------------------------------------------------------------------
def read_folder(folder: Path) -> Split:
    """The rows of one folder in whichever layout it has."""
    for name in ("metadata.jsonl", "metadata.csv"):
        if (folder / name).is_file():
            return _group(read_metadata(folder / name))
    jsons = [(p, d) for p in sorted(folder.glob("*.json")) if (d := _caption_json(p)) is not None]
    if jsons:
        return _group(*(read_json(p, d) for p, d in jsons))
    parquets = sorted(folder.rglob("*.parquet"))
    if parquets:
        return _group(*(read_parquet(p) for p in parquets))
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if images:
        return _group(read_sidecars(folder, images))
    raise DataError(
        f"{folder}: no captions found: expected metadata.jsonl, metadata.csv, a COCO captions .json, "
        "parquet files, or images with .txt captions beside them"
    )


def _group(*parts: Split) -> Split:
    """Merge rows of the same image (a file holds one row per caption) into one row: the same
    file, or for parquet rows, the same bytes."""
    merged, out = {}, Split()
    for part in parts:
        out.problems += part.problems
        for row in part.rows:
            key = row.image if row.data is None else hashlib.sha1(row.data).digest()
            if key in merged:
                merged[key].captions += row.captions
            else:
                merged[key] = row
                out.rows.append(row)
    return out


def _caption_row(image: Path, text, where: str, out: Split, data: bytes | None = None):
    if not isinstance(text, str) or not clean_caption(text):
        out.problems.append(f"{where}: empty caption for {image.name}")
    else:
        out.rows.append(Row(image, [text], where, data))


def read_metadata(path: Path) -> Split:
    """metadata.jsonl / metadata.csv: a row per (file_name, text or caption)."""
    out = Split()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        return Split(problems=[f"{path}: not UTF-8 text ({e})"])
    if path.suffix == ".csv":
        reader = csv.reader(lines)
        header = next(reader, [])
        records = []
        for n, values in enumerate(reader, start=2):
            if len(values) != len(header):
                out.problems.append(f"{path}:{n}: {len(values)} fields, the header has {len(header)}")
            else:
                records.append((n, dict(zip(header, values, strict=True))))
    else:
        records = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                out.problems.append(f"{path}:{n}: not valid JSON ({e.msg})")
                continue
            if not isinstance(record, dict):
                out.problems.append(f"{path}:{n}: not a JSON object")
                continue
            records.append((n, record))
    for n, record in records:
        where = f"{path}:{n}"
        text = record.get("text", record.get("caption"))
        if not record.get("file_name"):
            out.problems.append(f"{where}: no file_name")
        elif text is None:
            out.problems.append(f"{where}: no text or caption")
        else:
            _caption_row(path.parent / str(record["file_name"]), text, where, out)
    return out


def _caption_json(path: Path) -> dict | list | None:
    """The file's contents if it holds COCO captions (an object with images + annotations) or
    BLIP's list of {image, caption}; None for any other file."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(d, dict):
        return d if "images" in d and "annotations" in d else None
    return d if isinstance(d, list) and d and isinstance(d[0], dict) and "caption" in d[0] else None


def read_json(path: Path, d: dict | list) -> Split:
    """COCO captions `d`: annotations {image_id, caption} joined to images {id, file_name}; or a
    list of {image, caption}. Image paths are relative to the JSON file's folder."""
    out = Split()
    if isinstance(d, list):
        for n, record in enumerate(d):
            where = f"{path}: entry {n}"
            if not isinstance(record, dict) or not record.get("image") or "caption" not in record:
                out.problems.append(f"{where}: needs image and caption")
                continue
            captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
            for caption in captions:
                _caption_row(path.parent / str(record["image"]), caption, where, out)
        return out
    files = {}
    for n, image in enumerate(d["images"]):
        if not isinstance(image, dict) or "id" not in image or not image.get("file_name"):
            out.problems.append(f"{path}: images[{n}] needs id and file_name")
        else:
            files[image["id"]] = path.parent / str(image["file_name"])
    for n, ann in enumerate(d["annotations"]):
        where = f"{path}: annotations[{n}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            out.problems.append(f"{where}: needs image_id and caption")
        elif ann["image_id"] not in files:
            out.problems.append(f"{where}: image_id {ann['image_id']} is not in images")
        else:
            _caption_row(files[ann["image_id"]], ann["caption"], where, out)
    return out


def read_parquet(path: Path) -> Split:
    """An HF `datasets` parquet file: an `image` column of {bytes, path} and a `text` column."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet files needs pyarrow: pip install pyarrow") from None
    out = Split()
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        return Split(problems=[f"{path}: cannot read parquet ({str(e).splitlines()[0]})"])
    text_column = next((c for c in ("text", "caption") if c in table.column_names), None)
    if "image" not in table.column_names or text_column is None:
        return Split(problems=[f"{path}: needs an image column and a text (or caption) column, "
                               f"has {', '.join(table.column_names)}"])
    for n, (image, text) in enumerate(zip(table.column("image").to_pylist(), table.column(text_column).to_pylist(),
                                          strict=True)):
        where = f"{path}: row {n}"
        data = image.get("bytes") if isinstance(image, dict) else image if isinstance(image, bytes) else None
        if not data:
            out.problems.append(f"{where}: no image bytes")
            continue
        name = (image.get("path") if isinstance(image, dict) else None) or f"row {n}"
        _caption_row(Path(f"{path.name}: {name}"), text, where, out, data)
    return out


def read_sidecars(folder: Path, images: list[Path]) -> Split:
    """photo.jpg + photo.txt: each non-empty line of the .txt is a caption of the photo."""
    out = Split()
    for image in images:
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            out.problems.append(f"{image}: no caption file {txt.name}")
            continue
        lines = [line for line in txt.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        if not lines:
            out.problems.append(f"{txt}: empty caption for {image.name}")
        for n, line in enumerate(lines, start=1):
            _caption_row(image, line, f"{txt}:{n}", out)
    stems = {p.stem for p in images}
    for txt in sorted(folder.glob("*.txt")):
        if txt.stem not in stems:
            out.problems.append(f"{txt}: no image named {txt.stem}.*")
    return out


# --- the whole data set ---------------------------------------------------------------------------
def read_splits(root, val_fraction: float | None = None, seed: int = 0) -> tuple[Split, Split]:
    """(train, val) of a data folder. Without split folders (or split parquet files), a seeded
    `val_fraction` of the images is held out (captions of one image never land in both): by default 10%,
    and none of fewer than HANDFUL pictures (val is then empty: see blip/tool/plan.py)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    val_dir = next((root / n for n in VAL_NAMES if (root / n).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        return read_folder(root / "train"), read_folder(val_dir)
    parquets = sorted(root.rglob("*.parquet"))
    train_files = [p for p in parquets if p.name.startswith("train")]
    val_files = [p for p in parquets if p.name.split("-")[0] in VAL_NAMES]
    if train_files and val_files:
        return _group(*(read_parquet(p) for p in train_files)), _group(*(read_parquet(p) for p in val_files))
    if train_files:  # a snapshot with only a train split: hold out a fraction of it
        everything = _group(*(read_parquet(p) for p in train_files))
    else:
        everything = read_folder(root / "train" if (root / "train").is_dir() else root)
    return hold_out(everything, val_fraction, seed)


def read_eval_set(folder) -> Split:
    """An extra validation set (train.py --eval-data): a data folder's validation split when it has one
    (val/ or validation/), else all of the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")
    val_dir = next((folder / n for n in VAL_NAMES if (folder / n).is_dir()), None)
    return read_folder(val_dir or folder)


def read_replay_set(folder) -> Split:
    """Pictures of what a model knew, mixed into fine-tuning's batches (train.py --replay): a data folder's
    train/ split when it has one, else all of the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")
    return read_folder(folder / "train" if (folder / "train").is_dir() else folder)


def hold_out(split: Split, fraction: float | None, seed: int) -> tuple[Split, Split]:
    if fraction is None:
        fraction = 0.0 if len(split.rows) < HANDFUL else 0.1
    if fraction == 0:
        return split, Split()
    rows = list(split.rows)
    random.Random(seed).shuffle(rows)
    n_val = min(max(1, round(len(rows) * fraction)), len(rows) - 1) if len(rows) > 1 else 0
    return Split(rows[n_val:], split.problems), Split(rows[:n_val])


def check_images(split: Split, progress=None) -> Split:
    """Open every image; rows whose image is missing or unreadable become problems."""
    good = Split(problems=list(split.problems))
    for row in split.rows:
        try:
            if row.data is None and not row.image.is_file():
                raise ImageError(f"{row.image}: no such file")
            with Image.open(row.image if row.data is None else io.BytesIO(row.data)) as im:
                im.draft("RGB", (64, 64))  # JPEGs decode at a fraction of their size: a full read, faster
                im.load()
        except ImageError as e:
            good.problems.append(f"{row.where}: {e}")
        except Exception as e:  # whatever Pillow raises for a damaged file
            good.problems.append(f"{row.where}: {row.image}: cannot read image ({str(e).strip() or type(e).__name__})")
        else:
            good.rows.append(row)
        if progress is not None:
            progress.update(1)
    return good


# --- batches --------------------------------------------------------------------------------------
class TrainSet(torch.utils.data.Dataset):
    """(image, caption) pairs through BLIP's train transform, one pair per caption: an epoch sees every
    caption once, as BLIP trains. Indexed by (pair, seed): the sampler chooses the order and every
    sample's augmentation, so any process draws the same batch.

    With `cached`, a sample is not pixels but the index of its picture's tokens in train.py's cache of
    image tokens (blip/tool/token_cache.py): image i's view v (TrainTransform.view) is i * views + v."""

    def __init__(self, rows: list[Row], size: int, prompt: str, augment: str = "blip", cached: bool = False):
        self.rows = rows
        self.pairs = [(i, caption) for i, row in enumerate(rows) for caption in row.captions]
        self.transform = TrainTransform(size, augment)
        self.prompt, self.cached = prompt, cached

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        i, caption = self.pairs[index]
        caption = clean_caption(caption, MAX_WORDS)
        if self.cached:
            view = self.transform.view(seed)
            caption = flip_caption(caption) if view else caption
            return torch.tensor(i * self.transform.views + view), self.prompt + caption
        pixels, caption = self.transform(self.rows[i].load(), caption, seed)
        return pixels, self.prompt + caption


class EvalSet(torch.utils.data.Dataset):
    """Images through the eval transform, with their first caption (for the validation loss)."""

    def __init__(self, rows: list[Row], size: int, prompt: str):
        self.rows, self.size, self.prompt = rows, size, prompt

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        return eval_transform(row.load(), self.size), self.prompt + clean_caption(row.captions[0], MAX_WORDS)


def epoch_order(n: int, epoch: int, seed: int) -> list[tuple[int, int]]:
    """The (pair, augmentation seed) sequence of one epoch: a seeded shuffle, a seed per sample."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    seeds = torch.randint(0, 2**62, (n,), generator=g).tolist()
    return list(zip(order, seeds, strict=True))


class Collate:
    """[(pixels, text)] -> pixels (B, 3, H, W), input_ids (B, T), attention_mask (B, T)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch):
        pixels = torch.stack([p for p, _ in batch])
        ids, mask = self.tokenizer.batch([t for _, t in batch], self.max_length)
        return pixels, ids, mask
