"""blip/tool/data.py: every layout reads the same rows; every kind of bad row is named with its file and
line; splits keep an image on one side; captions are cleaned as BLIP does; the train transform is
seeded and keeps captions true."""

import csv
import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from blip.image import TrainTransform, flip_caption
from blip.tool.data import DataError, check_images, clean_caption, epoch_order, read_folder, read_splits

# (file name, captions): two images have two captions each
ITEMS = [
    ("a.png", ["A red ball on the grass."]),
    ("b.png", ["Two dogs: running!", "dogs running (fast)"]),
    ("c.jpg", ["a blue car"]),
    ("d.png", ["a cat on a mat", "the cat sits"]),
    ("e.png", ["a tree"]),
]


def picture(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (24 + i, 32, 3), dtype=np.uint8))


def write_images(folder, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, _) in enumerate(ITEMS):
        if names is None or name in names:
            picture(i).save(folder / name, quality=95)


def png_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    picture(i).save(buf, format="PNG")
    return buf.getvalue()


def make_layout(kind: str, folder):
    """The ITEMS data set written in one layout."""
    write_images(folder)
    rows = [(name, c) for name, caps in ITEMS for c in caps]
    if kind == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": c}) + "\n" for n, c in rows))
    elif kind == "csv":
        with open(folder / "metadata.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "caption"])
            w.writerows(rows)
    elif kind == "coco":
        images = [{"id": 10 + i, "file_name": name} for i, (name, _) in enumerate(ITEMS)]
        ids = {name: 10 + i for i, (name, _) in enumerate(ITEMS)}
        anns = [{"id": k, "image_id": ids[n], "caption": c} for k, (n, c) in enumerate(rows)]
        (folder / "captions_train.json").write_text(json.dumps({"images": images, "annotations": anns}))
    elif kind == "blip-json":
        (folder / "train.json").write_text(json.dumps([{"image": n, "caption": caps} for n, caps in ITEMS]))
    elif kind == "sidecar":
        for name, caps in ITEMS:
            (folder / name).with_suffix(".txt").write_text("\n".join(caps) + "\n")
    elif kind == "parquet":  # as `hf download <dataset> --repo-type dataset` leaves an HF datasets snapshot
        import pyarrow as pa
        import pyarrow.parquet as pq

        images = [{"bytes": (folder / n).read_bytes(), "path": n} for n, _ in rows]  # the files' own bytes
        for name, _ in ITEMS:
            (folder / name).unlink()
        (folder / "data").mkdir()
        pq.write_table(pa.table({"image": images, "text": [c for _, c in rows]}),
                       folder / "data" / "train-00000-of-00001.parquet")
    return folder


def content(split) -> list[tuple[bytes, tuple[str, ...]]]:
    """What a split holds, independent of layout: (pixels, captions) per image, sorted."""
    return sorted((np.asarray(row.load()).tobytes(), tuple(row.captions)) for row in split.rows)


LAYOUTS = ["jsonl", "csv", "coco", "blip-json", "sidecar", "parquet"]


def test_every_layout_reads_the_same_rows(tmp_path):
    expected = None
    for kind in LAYOUTS:
        split = read_folder(make_layout(kind, tmp_path / kind))
        assert split.problems == [], kind
        assert len(split.rows) == len(ITEMS), kind
        expected = expected or content(split)
        assert content(split) == expected, kind


def test_split_folders_and_held_out_fraction(tmp_path):
    make_layout("jsonl", tmp_path / "split" / "train")
    make_layout("sidecar", tmp_path / "split" / "validation")
    train, val = read_splits(tmp_path / "split")
    assert len(train.rows) == len(val.rows) == len(ITEMS)

    make_layout("jsonl", tmp_path / "one")
    train, val = read_splits(tmp_path / "one", val_fraction=0.4, seed=3)
    assert len(val.rows) == 2 and len(train.rows) == 3
    names = lambda s: {r.image.name for r in s.rows}  # noqa: E731
    assert not names(train) & names(val)  # both captions of an image stay on its side
    again = read_splits(tmp_path / "one", val_fraction=0.4, seed=3)
    assert names(again[1]) == names(val)  # seeded
    assert {len(r.captions) for r in train.rows + val.rows} == {1, 2}


def test_parquet_snapshot_with_only_a_train_split_is_held_out(tmp_path):
    make_layout("parquet", tmp_path / "football")
    train, val = read_splits(tmp_path / "football", val_fraction=0.2)
    assert len(train.rows) == 4 and len(val.rows) == 1 and all(r.data for r in train.rows)


def test_clean_caption_is_blips():
    assert clean_caption("Two  dogs: Running!\n(fast) ~ #1*") == "two dogs running fast 1"
    assert clean_caption("one two three four", max_words=2) == "one two"
    assert clean_caption(" .!? ") == "?"


def bad_layouts(tmp_path):
    """(folder, [expected message fragments]) for each kind of bad row."""
    cases = []
    d = tmp_path / "jsonl"
    write_images(d)
    Image.new("RGB", (4, 4)).save(d / "ok.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (d / "metadata.jsonl").write_text("\n".join([
        json.dumps({"file_name": "a.png", "text": "fine"}),
        "{not json",
        json.dumps({"text": "no file"}),
        json.dumps({"file_name": "b.png"}),
        json.dumps({"file_name": "c.jpg", "text": " ... "}),
        json.dumps({"file_name": "missing.png", "text": "gone"}),
        json.dumps({"file_name": "broken.png", "text": "broken"}),
        json.dumps({"file_name": "ok.png", "text": "fine too"}),
    ]) + "\n")
    cases.append((d, ["metadata.jsonl:2: not valid JSON", "metadata.jsonl:3: no file_name",
                      "metadata.jsonl:4: no text or caption", "metadata.jsonl:5: empty caption",
                      "metadata.jsonl:6: ", "missing.png: no such file", "metadata.jsonl:7: ", "broken.png"]))
    d = tmp_path / "csv"
    write_images(d)
    (d / "metadata.csv").write_text("file_name,text\na.png,fine\nb.png,too,many\nc.jpg,\n")
    cases.append((d, ["metadata.csv:3: 3 fields, the header has 2", "metadata.csv:4: empty caption"]))
    d = tmp_path / "coco"
    write_images(d)
    (d / "captions.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2}],
        "annotations": [{"image_id": 1, "caption": "fine"}, {"image_id": 9, "caption": "who"}, {"image_id": 1}],
    }))
    cases.append((d, ["images[1] needs id and file_name", "annotations[1]: image_id 9 is not in images",
                      "annotations[2]: needs image_id and caption"]))
    d = tmp_path / "sidecar"
    write_images(d)
    for name, caps in ITEMS[:3]:
        (d / name).with_suffix(".txt").write_text("fine " + caps[0])
    (d / "d.txt").write_text("  \n")
    (d / "zzz.txt").write_text("orphan caption")
    cases.append((d, ["d.txt: empty caption for d.png", "e.png: no caption file e.txt", "zzz.txt: no image named zzz"]))
    d = tmp_path / "parquet"
    d.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": png_bytes(0), "path": "x.png"}, {"bytes": None, "path": "y.png"},
              {"bytes": b"garbage", "path": "z.png"}, {"bytes": png_bytes(1), "path": "w.png"}]
    pq.write_table(pa.table({"image": images, "text": ["fine", "no bytes", "bad bytes", None]}), d / "t.parquet")
    cases.append((d, ["t.parquet: row 1: no image bytes", "t.parquet: row 2: ", "z.png", "row 3: empty caption"]))
    return cases


def test_every_bad_row_is_named(tmp_path):
    for folder, fragments in bad_layouts(tmp_path):
        split = check_images(read_folder(folder))
        text = "\n".join(split.problems)
        for fragment in fragments:
            assert fragment in text, (folder.name, fragment, text)
        assert split.rows, folder.name  # the good rows survive
        assert all("fine" in c for r in split.rows for c in r.captions), folder.name


def test_folder_without_captions_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no captions found"):
        read_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="data folder not found"):
        read_splits(tmp_path / "nope")


def test_flip_swaps_left_and_right():
    assert flip_caption("a dog on the left, a cat at the top right") == "a dog on the right, a cat at the top left"
    assert flip_caption("leftover wrights") == "leftover wrights"


def test_train_transform_is_seeded_and_keeps_captions_true():
    """The same seed gives the same pixels anywhere (and leaves the global random streams alone);
    a flipped picture comes with left and right swapped."""
    im = Image.new("RGB", (96, 96), (230, 230, 230))
    im.paste((200, 20, 20), (4, 30, 34, 60))  # a red square on the left
    transform = TrainTransform(64)

    def draws():
        return random.random(), np.random.rand(), torch.rand(1).item()

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    untouched = draws()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    a, cap_a = transform(im, "a red square on the left", seed=11)
    b, cap_b = transform(im, "a red square on the left", seed=11)
    assert draws() == untouched  # the global streams are as they were
    assert torch.equal(a, b) and cap_a == cap_b and a.shape == (3, 64, 64)
    red_on_left = []
    for seed in range(40):
        x, caption = transform(im, "a red square on the left", seed)
        red = (x[0] > 1.0) & (x[1] < 0)  # normalised: strong red, little green
        cols = red.nonzero()[:, 1].float()
        if len(cols):
            red_on_left.append((cols.mean().item() < 32) == caption.endswith("left"))
    assert len(red_on_left) > 30 and all(red_on_left)
    assert {transform(im, "left", s)[1] for s in range(20)} == {"left", "right"}


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(50, epoch=2, seed=1), epoch_order(50, epoch=2, seed=1)
    assert a == b and sorted(i for i, _ in a) == list(range(50))
    assert [i for i, _ in epoch_order(50, epoch=3, seed=1)] != [i for i, _ in a]
