"""A captioning data set the project makes itself: one coloured shape per picture, captioned with
its size, colour, shape and place ("a small red circle at the top left").

It is what `make demo` trains on and what the learning tests use: the real BLIP data cannot be
downloaded here, and a set whose every caption is exactly right shows plainly whether a captioner
learned to read the image (colour, shape, size) and where things are in it (place).

    python -m blip.tool.shapes data/shapes --train 800 --val 200 --test 200

writes `train/`, `val/` and `test/` folders of PNG pictures, each with a `metadata.jsonl` (`file_name`,
`text`): the image-folder layout that `blip/tool/data.py` reads. train.py trains on train/ and chooses its
best/ on val/; test/ is for the numbers a run reports, which nothing was chosen on.
"""

import argparse
import json
import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

SIZES = {"small": (0.2, 0.24), "large": (0.34, 0.4)}  # shape diameter as a fraction of the picture side
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
    "yellow": (240, 200, 20), "purple": (140, 40, 170), "orange": (250, 130, 20),
}
SHAPES = ["circle", "square", "triangle", "star"]
ROWS = ["top", "", "bottom"]  # the picture is a 3 x 3 grid of places
COLUMNS = ["left", "", "right"]
CENTRES = [0.2, 0.5, 0.8]  # where a shape's centre is, along each axis, for each of the 3 places


def place_name(row: int, col: int) -> str:
    """(row, col) on the 3 x 3 grid -> words: "at the top left", "on the right", "in the middle"."""
    r, c = ROWS[row], COLUMNS[col]
    if r and c:
        return f"at the {r} {c}"
    if r:
        return f"at the {r}"
    if c:
        return f"on the {c}"
    return "in the middle"


def polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Corner points of a square, triangle or five-pointed star around (cx, cy), each about as
    large as a circle of `radius`, so that size reads the same for every shape."""
    if shape == "square":
        n, outer, inner, turn = 4, 1.25 * radius, 1.25 * radius, math.pi / 4
    elif shape == "triangle":
        n, outer, inner, turn = 3, 1.55 * radius, 1.55 * radius, -math.pi / 2
    else:  # star: 5 outer points and 5 inner ones, alternating
        n, outer, inner, turn = 10, 1.45 * radius, 0.65 * radius, -math.pi / 2
    points = []
    for k in range(n):
        r = outer if k % 2 == 0 else inner
        a = angle + turn + k * 2 * math.pi / n
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def draw(rng: random.Random, side: int = 128) -> tuple[Image.Image, str]:
    """One random picture and its caption."""
    size, colour, shape = rng.choice(list(SIZES)), rng.choice(list(COLOURS)), rng.choice(SHAPES)
    row, col = rng.randrange(3), rng.randrange(3)
    grey = rng.randint(200, 250)  # a light, neutral background: the caption names only the shape's colour
    im = Image.new("RGB", (side, side), (grey, grey, grey))
    pen = ImageDraw.Draw(im)
    for _ in range(rng.randint(0, 6)):  # faint specks, so that the background is not a constant
        x, y, r = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(1, 3)
        g = grey + rng.randint(-25, 0)
        pen.ellipse([x - r, y - r, x + r, y + r], fill=(g, g, g))
    radius = rng.uniform(*SIZES[size]) * side / 2
    jitter = side / 32  # the centre moves a little around its place
    cx = CENTRES[col] * side + rng.uniform(-jitter, jitter)
    cy = CENTRES[row] * side + rng.uniform(-jitter, jitter)
    rgb = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[colour])
    if shape == "circle":
        pen.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=rgb)
    else:
        pen.polygon(polygon(shape, cx, cy, radius, rng.uniform(-0.2, 0.2)), fill=rgb)
    return im, f"a {size} {colour} {shape} {place_name(row, col)}"


def write_split(folder: Path, n: int, rng: random.Random, side: int, picture=None):
    """n pictures (`picture`(rng, side) -> (image, caption); default: `draw`) as PNGs + metadata.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(n):
            im, text = (picture or draw)(rng, side)
            name = f"{i:05d}.png"
            im.save(folder / name)
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")


def data_set_main(argv, description: str, train: int, picture, possible: int) -> int:
    """The command line that writes a generated data set: train/, val/ and test/ splits of `picture`'s
    pictures (blip/tool/shapes.py's own, pitch.py's players, harbour.py's boats), `possible` captions
    in all. val/ is what training evaluates on and keeps its best by; test/ is for reporting only."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("out", help="folder to write (train/, val/ and test/ are made inside it)")
    p.add_argument("--train", type=int, default=train, help=f"training pictures (default: {train})")
    p.add_argument("--val", type=int, default=200, help="validation pictures: train.py evaluates on them and keeps\n"
                   "its best/ by them (default: 200)")
    p.add_argument("--test", type=int, default=200, help="test pictures, which no run trains or chooses on: the\n"
                   "numbers to report (default: 200)")
    p.add_argument("--side", type=int, default=128, help="picture side in pixels (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same pictures")
    args = p.parse_args(argv)
    out = Path(args.out)
    rng = random.Random(args.seed)
    for split, n in (("train", args.train), ("val", args.val), ("test", args.test)):  # test/ last: the others
        write_split(out / split, n, rng, args.side, picture)  # are the same pictures with or without it
    print(f"wrote {args.train} training, {args.val} validation and {args.test} test pictures to {out} "
          f"({possible} possible captions)")
    return 0


def main(argv=None) -> int:
    return data_set_main(argv, "Write a shapes captioning data set: train/, val/ and test/ folders of PNG pictures "
                         "with metadata.jsonl captions (size, colour, shape, place).", 800, draw,
                         len(SIZES) * len(COLOURS) * len(SHAPES) * 9)


if __name__ == "__main__":
    sys.exit(main())
