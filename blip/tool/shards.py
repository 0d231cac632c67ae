"""Data sets kept as shards: webdataset tar files and parquet files of image bytes, read as streams, and one
caption output per shard, written whole or not at all, so that a killed or pre-empted job resumes by shard.

- tar (webdataset, as img2dataset writes it): members `key.jpg`, `key.txt`, `key.json`, ...; a sample per
  key, the member's path up to the first dot of its base name. Its image is the member with an image
  suffix; the other members are not read.
- parquet (img2dataset, HF `datasets` snapshots): an image column, `image` ({bytes, path} or bytes) or
  bytes in `jpg` / `jpeg` / `png` / `webp`; the key is the `key` column, else the image's `path`, else
  the row number. Read a row group at a time.
- brace patterns, as webdataset writes them: `shards/{00000..00099}.tar`, `{train,val}.parquet`.
Nothing is extracted to disk. A sample's key is its identity in every output.

Outputs: `DIR/<shard name>.parquet` (columns key, caption, error, and score with --rerank) or `.jsonl`
({"key", "caption"} or {"key", "error"} lines), in the shard's order.
"""

import glob
import itertools
import json
import os
import re
import tarfile
from pathlib import Path

from blip.image import IMAGE_SUFFIXES
from blip.tool.outputs import temporary

SHARD_SUFFIXES = (".tar", ".parquet")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
BRACES = re.compile(r"\{([^{}]*)\}")


class ShardError(ValueError):
    """A shard that cannot be read to its end (not a tar or parquet file, cut short, no image column)."""


def expand_braces(pattern: str) -> list[str]:
    """`a/{00..02}.tar` -> a/00.tar, a/01.tar, a/02.tar (zero padding kept); `{x,y}.tar` -> x.tar, y.tar;
    several braces multiply. A brace with neither `..` nor `,` is left as it is."""
    m = next((m for m in BRACES.finditer(pattern) if ".." in m[1] or "," in m[1]), None)
    if m is None:
        return [pattern]
    body = m[1]
    ends = body.split("..")
    if len(ends) == 2 and ends[0].isdigit() and ends[1].isdigit():
        first, last = int(ends[0]), int(ends[1])
        width = len(ends[0]) if ends[0].startswith("0") else 0
        step = 1 if last >= first else -1
        choices = [str(i).zfill(width) for i in range(first, last + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [out for c in choices for out in expand_braces(head + c + tail)]


def is_shard(path) -> bool:
    return str(path).lower().endswith(SHARD_SUFFIXES)


def shard_arguments(paths: list[str]) -> tuple[list[str], list[str]]:
    """caption.py's PATH arguments -> (those that name shards: tar or parquet files, brace patterns or globs
    of them; the rest: pictures, folders, their globs)."""
    shards, rest = [], []
    for arg in paths:
        (shards if all(is_shard(p) for p in expand_braces(arg)) else rest).append(arg)
    return shards, rest


def list_shards(args: list[str]) -> tuple[list[Path], list[str]]:
    """Shard arguments -> (shard files in the order given, each once; problems, one line each)."""
    found, problems = {}, []
    for arg in args:
        for pattern in expand_braces(arg):
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern, recursive=True))
                if not matches:
                    problems.append(f"{pattern}: no files match")
            else:
                matches = [pattern]
            for m in matches:
                if Path(m).is_file():
                    found.setdefault(os.path.realpath(m), Path(m))
                else:
                    problems.append(f"{m}: no such file")
    return list(found.values()), problems


# --- reading a shard: (key, image bytes) in order -------------------------------------------------------
def samples(shard: Path):
    """Yield (key, image bytes) of each sample of a tar or parquet shard, streamed; (key, None) for a
    sample without an image. Raises ShardError when the shard cannot be read on."""
    return tar_samples(shard) if shard.suffix.lower() == ".tar" else parquet_samples(shard)


def tar_samples(shard: Path):
    key, image = None, None
    try:
        with tarfile.open(shard, "r|*") as tar:  # a stream: members in the order they were written
            for member in tar:
                if not member.isfile():
                    continue
                folder, name = os.path.split(member.name)
                this = os.path.join(folder, name.split(".", 1)[0])
                if this != key:
                    if key is not None:
                        yield key, image
                    key, image = this, None
                if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and image is None:
                    image = tar.extractfile(member).read()
            end = tar.offset  # where the end-of-archive blocks begin
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{shard}: not a tar file that reads to its end ({e})") from None
    if shard.stat().st_size < end + tarfile.BLOCKSIZE:  # tarfile ends quietly at a header cut short
        raise ShardError(f"{shard}: cut short after {key or 'its start'} (no end-of-archive blocks)")
    if key is not None:
        yield key, image


def parquet_samples(shard: Path):
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(shard)
    except Exception as e:  # pyarrow raises its own error classes for a file that is not parquet
        raise ShardError(f"{shard}: not a parquet file ({e})") from None
    names = f.schema_arrow.names
    column = next((c for c in IMAGE_COLUMNS if c in names), None)
    if column is None:
        raise ShardError(f"{shard}: no image column (one of {', '.join(IMAGE_COLUMNS)}); it has {', '.join(names)}")
    columns = [c for c in (*IMAGE_COLUMNS, "key") if c in names]
    row = itertools.count()
    try:
        for group in range(f.num_row_groups):
            for record in f.read_row_group(group, columns=columns).to_pylist():
                yield key_and_image(record, next(row))
    except OSError as e:
        raise ShardError(f"{shard}: cannot be read on ({e})") from None


def key_and_image(record: dict, n: int) -> tuple[str, bytes | None]:
    """A row of a shard (parquet's columns, or a webdataset sample's {__key__, jpg, ...} as Ray Data reads it)
    -> (its key, its image bytes or None). `n`: the row's number, the key when there is no other."""
    # the first column that holds bytes (a sample without that suffix holds None, or NaN in a Ray batch)
    image = next((record[c] for c in IMAGE_COLUMNS if isinstance(record.get(c), (bytes, dict))), None)
    path = None
    if isinstance(image, dict):  # HF datasets' Image feature: {bytes, path}
        image, path = image.get("bytes"), image.get("path")
    return str(record.get("__key__") or record.get("key") or path or n), image


# --- writing a shard's captions, whole or not at all ------------------------------------------------------
def output_path(out_dir: Path, shard: Path, fmt: str) -> Path:
    """DIR/00000.parquet for shards/00000.tar (or .jsonl)."""
    return Path(out_dir) / f"{shard.name.rsplit('.', 1)[0]}.{fmt}"


def write_output(path: Path, records: list[dict], fmt: str, scored: bool):
    """A shard's records ({"key", "caption"[, "score"]} or {"key", "error"}) -> `path`, written under a
    temporary name and renamed into place: the file is whole or absent."""
    tmp = temporary(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {"key": pa.string(), "caption": pa.string(), "error": pa.string()}
        if scored:
            columns["score"] = pa.float64()
        table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records], schema=pa.schema(columns))
        pq.write_table(table, tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_output(path: Path) -> list[dict]:
    """The records of a shard's output file (parquet or jsonl), in order."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [{k: v for k, v in r.items() if v is not None} for r in pq.read_table(path).to_pylist()]
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
