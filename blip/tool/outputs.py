"""Where caption.py's captions go: one stream or FILE (text, jsonl, csv), or a caption file beside each picture.

Captioning a data set takes hours and gets killed (spot machines, Ctrl-C), so each way survives a kill:
- a stream or FILE gets each caption as soon as it exists (flushed); a FILE continued with --resume skips
  the pictures it already holds, after dropping a line the kill cut short;
- a caption file ("sidecar": photo.jpg -> photo.txt) is written whole under a temporary name and renamed
  into place, so it is the old file or the new one, never a partial or an empty one;
- a run that changes caption files that exist (--existing overwrite, append, prepend) keeps a journal of
  the pictures it has done, so that the rerun after a kill skips them instead of appending twice.
Paths are written as listing.shown() gives them: names that are not UTF-8 with their odd bytes escaped.
"""

import csv
import io
import json
import os
from pathlib import Path

from blip.tool.listing import identity, shown

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
            self.out.write(json.dumps({"image": shown(path), "caption": caption, **extra}, ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            self.csv.writerow([shown(path), caption, *extra.values()])
        else:
            self.out.write(f"{shown(path)}: {caption}\n")
        self.out.flush()

    def fail(self, path, error: str):
        if self.fmt == "jsonl":
            self.out.write(json.dumps({"image": shown(path), "error": error}, ensure_ascii=False) + "\n")
            self.out.flush()


# --- FILE under torchrun: a part per process, merged at the end or taken in by a --resume ------------------
def part_name(output, rank: int) -> str:
    return f"{output}.part-{rank}"


def parts_of(output) -> list[Path]:
    return sorted(Path(output).parent.glob(f"{Path(output).name}.part-*"))


def rewrite(output: Path, fmt: str, records: list[dict], scored: bool):
    """FILE holds `records`, whole (written beside it and renamed into place)."""
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        stream = Stream(f, fmt, scored=scored)
        for r in records:
            if "error" in r:
                stream.fail(r["image"], r["error"])
            else:
                stream.write(r["image"], r["caption"], float(r["score"]) if r.get("score") not in (None, "") else None)
    os.replace(tmp, output)


def merge_parts(output: Path, fmt: str, todo: list, earlier: list[dict]):
    """torchrun: the processes' part files (after what FILE held before) -> FILE, the pictures in input
    order as one process would have written them; the parts are removed."""
    parts = parts_of(output)
    order = {identity(path): i for i, (path, _) in enumerate(todo)}
    new = [r for p in parts for r in read_records(p, fmt)]
    new.sort(key=lambda r: order.get(identity(r["image"]), len(order)))
    rewrite(output, fmt, earlier + new, scored=any("score" in r for r in earlier + new))
    for p in parts:
        p.unlink()


def fold_parts(output: Path, fmt: str):
    """The parts of a killed torchrun run, appended to FILE (made if need be), before a --resume goes on."""
    parts = parts_of(output)
    if parts:
        earlier = read_records(output, fmt) if output.is_file() else []
        merge_parts(output, fmt, [], earlier)


def drop_superseded(output: Path, fmt: str):
    """An error record of a picture that a later run captioned is dropped from FILE (jsonl keeps errors)."""
    if fmt != "jsonl" or not output.is_file():
        return
    records = read_records(output, fmt)
    captioned = {identity(r["image"]) for r in records if "caption" in r}
    kept = [r for r in records if "caption" in r or identity(r["image"]) not in captioned]
    if len(kept) < len(records):
        rewrite(output, fmt, kept, scored=any("score" in r for r in kept))


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


def read_any(path: Path) -> str:
    """A text file written by any tool: UTF-8, else Windows' cp1252, else latin-1 (which reads any bytes)."""
    data = path.read_bytes()
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def temporary(path: Path) -> Path:
    """Where `path`'s next version is written before it is renamed into place: one name per file, so that
    the run after a kill writes over (or finishes) what the killed one left."""
    return path.with_name(f".{path.name}.tmp")


class Journal:
    """The pictures a run that changes existing caption files has written, an identity per line. A picture
    is journaled once its new caption file is whole on disk (under its temporary name) and before that is
    renamed into place: the rerun after a kill finishes the rename and skips the picture. The journal is
    removed when a run ends with every picture captioned."""

    def __init__(self, path: Path):
        self.path, self.file = path, None

    def read(self) -> set[str]:
        if not self.path.is_file():
            return set()
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        return set(text[: text.rfind("\n") + 1].splitlines())  # not a last line that a kill cut short

    def add(self, key: str):
        if self.file is None:
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write(key + "\n")
        self.file.flush()

    def remove(self):
        if self.file is not None:
            self.file.close()
        self.path.unlink(missing_ok=True)


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

    def clashes(self, pictures: list) -> list[list]:
        """Groups of (picture, root) whose caption files would be one file: a.jpg and a.png; A.jpg and a.png,
        one file where names ignore case (macOS, Windows)."""
        by_target = {}
        for path, root in pictures:
            by_target.setdefault(str(self.target(path, root)).casefold(), []).append((path, root))
        return [pairs for pairs in by_target.values() if len(pairs) > 1]

    def finish(self, image: Path, root: Path):
        """A journaled picture: put its caption file in place if a kill came before the rename."""
        path = self.target(image, root)
        if temporary(path).is_file():
            os.replace(temporary(path), path)

    def write(self, image: Path, root: Path, caption: str, journal: Journal | None = None):
        path = self.target(image, root)
        path.parent.mkdir(parents=True, exist_ok=True)
        old = read_any(path).strip() if self.existing in ("append", "prepend") and path.is_file() else ""
        if old and self.existing == "append":
            caption = old + self.separator + caption
        elif old and self.existing == "prepend":
            caption = caption + self.separator + old
        tmp = temporary(path)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(caption + "\n")
            f.flush()
            os.fsync(f.fileno())
        if journal is not None:
            journal.add(identity(image))
        os.replace(tmp, path)
