"""blip/tool/pitch.py: the same seed writes the same pictures; every caption is one of the grammar's and
true of its picture (count, colour and place measured in the pixels); the vocabulary shares shapes'
words; blip/tool/data.py reads what it writes."""

import json
import random
import re

import numpy as np
from PIL import Image

from blip.tool import pitch, shapes
from blip.tool.data import read_splits

SIDE = 128
PLACE = "|".join(re.escape(shapes.place_name(r, c)) for r in range(3) for c in range(3))
GRAMMAR = re.compile(rf"(one|two) ({'|'.join(shapes.COLOURS)}) (players?) and a ball ({PLACE})")


def test_same_seed_same_pictures(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        pitch.main([str(tmp_path / name), "--train", "4", "--val", "2", "--test", "2", "--side", "64", "--seed",
                    str(seed)])
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 4 + 2 + 2 + 3  # pictures and a metadata.jsonl per split
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    captions = [(tmp_path / d / "train" / "metadata.jsonl").read_text() for d in ("a", "c")]
    assert captions[0] != captions[1]


def test_grammar_and_shared_words():
    captions = pitch.possible_captions()
    assert len(captions) == len(set(captions)) == 2 * 6 * 9
    assert all(GRAMMAR.fullmatch(c) for c in captions)
    shape_words = {w for r in range(3) for c in range(3) for w in shapes.place_name(r, c).split()}
    shape_words |= {"a", *shapes.SIZES, *shapes.COLOURS, *shapes.SHAPES}
    pitch_words = {w for c in captions for w in c.split()}
    assert pitch_words - shape_words == {"one", "two", "player", "players", "and", "ball"}
    assert shape_words - pitch_words == {*shapes.SIZES, *shapes.SHAPES}


def measured(im: Image.Image, colour: str) -> tuple[int, int, int]:
    """(players, row, col) read from the pixels: shirts are drawn within 20 of their colour in every
    channel and nothing else is; the ball is the only white."""
    a = np.asarray(im).astype(int)
    for other, rgb in shapes.COLOURS.items():
        near = np.abs(a - np.array(rgb)).max(axis=2) <= 20
        if other == colour:
            shirts = near
        else:
            assert not near.any(), f"{other} pixels in a picture of {colour} shirts"
    columns = shirts.any(axis=0).astype(int)
    players = int((np.diff(columns, prepend=0) == 1).sum())  # runs of columns that hold shirt
    assert (a >= 240).all(axis=2).sum() > 10  # the ball
    ys, xs = np.nonzero(shirts)
    row, col = (min(2, int(3 * (v.min() + v.max()) / 2 / SIDE)) for v in (ys, xs))
    return players, row, col


def test_captions_are_true_of_their_pictures():
    rng = random.Random(0)
    seen = set()
    for _ in range(100):
        im, text = pitch.draw(rng, SIDE)
        m = GRAMMAR.fullmatch(text)
        assert m, text
        count, colour, players, place = m.groups()
        assert (players == "player") == (count == "one")
        n, row, col = measured(im, colour)
        assert (n, shapes.place_name(row, col)) == ({"one": 1, "two": 2}[count], place), text
        seen.add(text)
    assert len(seen) > 50  # the draws spread over the captions


def test_read_splits_reads_it(tmp_path):
    pitch.main([str(tmp_path / "d"), "--train", "5", "--val", "3", "--test", "2", "--side", "64"])
    train, val = read_splits(tmp_path / "d")
    assert (len(train.rows), len(val.rows)) == (5, 3) and not train.problems
    rows = [json.loads(line) for line in (tmp_path / "d" / "val" / "metadata.jsonl").read_text().splitlines()]
    assert [r.captions for r in val.rows] == [[r["text"]] for r in rows]
    assert all(Image.open(r.image).size == (64, 64) for r in val.rows)
