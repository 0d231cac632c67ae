"""The pictures caption.py is given: image files, folders and glob patterns, listed once, as a stream.

- A folder is walked in name order (a sub-folder's pictures where its name sorts), reading each folder's
  entries once: no stat per picture, so a folder of a million pictures lists in seconds, with a count on
  stderr while it does.
- Symlinked folders are followed, each real folder once (by device and inode): no loops, no picture twice.
- Hidden folders and files (".ipynb_checkpoints", "._photo.jpg") are skipped unless asked for.
- A picture's identity is its folder's real path and its name: the same picture spelled relative and
  absolute, or reached through a symlinked folder, is one picture, in this run and in an earlier run's
  records that --resume reads.
- A file name that is not valid UTF-8 is shown (in every output and message) with its odd bytes escaped,
  "caf\\xe9.jpg"; the same escaping of a record read back gives the same identity.
"""

import functools
import glob
import itertools
import os
import re
import sys
from pathlib import Path

from tqdm import tqdm

from blip.image import IMAGE_SUFFIXES

STALE = re.compile(r"^\..+\.tmp(-\d+)?$")  # a caption file's temporary copy that a killed run left (outputs.py)


def shown(path) -> str:
    """`path` as text that any output can hold: its bytes that are not UTF-8 escaped as \\xNN."""
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


@functools.lru_cache(maxsize=1 << 16)
def real_folder(folder: str) -> str:
    """An absolute folder's real path (cached: the key must not depend on the working directory)."""
    return os.path.realpath(folder)


def identity(path) -> str:
    """The picture `path` names, however it is spelled: its folder's real path joined with its name (one
    realpath per folder, not per picture). `path` may be a shown() string of an earlier run's record."""
    head, name = os.path.split(shown(path))
    return os.path.join(real_folder(os.path.abspath(head or ".")), name)


class Listing:
    """PATH arguments -> pictures [(image file, the folder it was found in)], problems (one line each), and
    the temporary files killed runs left in the folders walked (`stale`)."""

    def __init__(self, paths: list[str], hidden: bool = False, progress: bool = True):
        self.hidden = hidden
        self.pictures, self.problems, self.stale = [], [], []
        self.seen = set()  # (device, inode) of every real folder walked
        self.bar = tqdm(desc="listing", unit=" pictures", delay=1, disable=not progress, file=sys.stderr,
                        dynamic_ncols=True)
        with self.bar:
            for arg in paths:
                self.add(arg)

    def add(self, arg: str):
        path = Path(arg)
        if path.is_dir():
            before = len(self.pictures)
            self.walk(path, path)
            if len(self.pictures) == before:
                self.problems.append(f"{shown(arg)}: no images in this folder")
        elif path.exists():
            self.found(path, path.parent)
        elif glob.has_magic(arg):
            matches = sorted(Path(f) for f in glob.glob(arg, recursive=True) if Path(f).is_file())
            if not matches:
                self.problems.append(f"{shown(arg)}: no files match")
            fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), path.parts))
            for f in matches:
                self.found(f, Path(*fixed) if fixed else Path("."))
        else:
            self.problems.append(f"{shown(arg)}: no such file or folder")

    def found(self, path: Path, root: Path):
        self.pictures.append((path, root))
        self.bar.update()

    def walk(self, folder: Path, root: Path):
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in self.seen:
                return
            self.seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            self.problems.append(f"{shown(folder)}: cannot be read ({e.strerror})")
            return
        for entry in entries:
            if entry.name.startswith("."):
                if STALE.match(entry.name) and entry.is_file(follow_symlinks=False):
                    self.stale.append(Path(entry.path))
                if not self.hidden:
                    continue
            try:
                if entry.is_dir():  # a symlinked folder too: followed, once
                    self.walk(Path(entry.path), root)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
                    self.found(Path(entry.path), root)
            except OSError:  # a link to nowhere, or an entry that vanished while listed
                continue
