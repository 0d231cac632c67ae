"""Where caption.py's captions go: one stream or FILE (text, jsonl, csv), or a caption file beside each picture.

Captioning a data set takes hours and gets killed (spot machines, Ctrl-C), so each way survives a kill:
- a stream or FILE gets each caption as soon as it exists (flushed); a FILE continued with --resume skips
  the pictures it already holds, after dropping a line the kill cut short;
- a caption file ("sidecar": photo.jpg -> photo.txt) is written whole under a temporary name and renamed
  into place, so it is the old file or the new one, never a partial or an empty one.
"""

import csv
import io
import json
import os
from pathlib import Path

EXISTING = ("skip", "overwrite", "append", "prepend")  # what to do with a picture's caption file that exists


class Stream:
    """Captions as text ("PATH: caption"), jsonl ({"image", "caption"}) or csv (image,caption) lines on one
    stream. A failed picture gets a jsonl record of its own ({"image", "error"}); text and csv name it on
    stderr only."""

    def __init__(self, out, fmt: str, scored: bool = False, header: bool = True):
        self.out, self.fmt = out, fmt
        if fmt == "csv":
            self.csv = csv.writer(out)
            if header:
                self.csv.writerow(["image", "caption", "score"] if scored else ["image", "caption"])

    def write(self, path, caption: str, score: float | None = None):
        extra = {} if score is None else {"score": round(score, 6)}
        if self.fmt == "jsonl":
            self.out.write(json.dumps({"image": str(path), "caption": caption, **extra}, ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            self.csv.writerow([str(path), caption, *extra.values()])
        else:
            self.out.write(f"{path}: {caption}\n")
        self.out.flush()

    def fail(self, path, error: str):
        if self.fmt == "jsonl":
            self.out.write(json.dumps({"image": str(path), "error": error}, ensure_ascii=False) + "\n")
            self.out.flush()


def captioned(path: Path, fmt: str) -> list[dict]:
    """The caption records a jsonl or csv FILE holds ({"image", "caption", ...}), in order; error
    records are left out (their pictures are tried again)."""
    return [r for r in read_records(path, fmt) if "caption" in r]


def read_records(path: Path, fmt: str) -> list[dict]:
    """Every record of a jsonl or csv FILE, in order. A last line that a kill cut short is cut off the
    file, so that what is appended next starts on a line of its own."""
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    text = whole.decode("utf-8", errors="replace")
    if fmt == "jsonl":
        records = []
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "image" in record and ("caption" in record or "error" in record):
                records.append(record)
        return records
    rows = list(csv.reader(io.StringIO(text)))
    header = rows[0] if rows else []
    return [dict(zip(header, row, strict=False)) for row in rows[1:] if len(row) >= 2]


def write_atomic(path: Path, text: str):
    """`path` holds `text`, whole, or (after a kill) what it held before: never a part of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Sidecars:
    """A caption file per picture: beside it (photo.jpg -> photo.txt), or under `output_dir` at the
    picture's place relative to the folder it was found in. `existing` says what happens to one that
    exists: skip the picture, overwrite, or append / prepend the new caption with `separator`."""

    def __init__(self, ext: str = ".txt", existing: str = "skip", separator: str = "\n", output_dir=None):
        self.ext = ext if ext.startswith(".") else f".{ext}"
        self.existing, self.separator = existing, separator
        self.output_dir = Path(output_dir) if output_dir else None

    def target(self, image: Path, root: Path) -> Path:
        if self.output_dir is None:
            return image.with_suffix(self.ext)
        return (self.output_dir / image.relative_to(root)).with_suffix(self.ext)

    def pending(self, image: Path, root: Path) -> bool:
        """Does this picture still need a caption? (Not when its file exists and existing is skip.)"""
        return self.existing != "skip" or not self.target(image, root).is_file()

    def write(self, image: Path, root: Path, caption: str):
        path = self.target(image, root)
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
        if old and self.existing == "append":
            caption = old + self.separator + caption
        elif old and self.existing == "prepend":
            caption = caption + self.separator + old
        write_atomic(path, caption + "\n")
