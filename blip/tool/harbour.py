"""A third generated captioning data set: sailing boats on the water, captioned with how many boats,
their sails' colour, which way they sail and where they are ("two red boats sailing left at the top
right").

It checks what blip/tool/pitch.py was used to tune: the small-set defaults (blip/tool/plan.py) were chosen
on pitch pictures, and is then run unchanged on these. Like pitch it shares shapes' colours and 3 x 3
places and adds new words ("boat", "boats", "sailing") and a new background; unlike pitch, each caption
also says which way the boats head, which a horizontal flip turns round (as it turns "left" into
"right" in the caption).

    python -m blip.tool.harbour data/harbour --train 256 --val 200 --test 200
"""

import random
import sys

from PIL import Image, ImageDraw

from . import shapes
from .shapes import CENTRES, COLOURS, place_name

COUNTS = {1: "one", 2: "two"}
HEADINGS = ("left", "right")
LENGTH = (0.26, 0.3)  # a boat's length as a fraction of the picture side
WATER = (90, 140, 200)


def caption(count: int, colour: str, heading: str, row: int, col: int) -> str:
    """The one true caption of a picture: "one blue boat sailing right in the middle"."""
    boats = "boat" if count == 1 else "boats"
    return f"{COUNTS[count]} {colour} {boats} sailing {heading} {place_name(row, col)}"


def possible_captions() -> list[str]:
    return [caption(n, c, h, r, k) for n in COUNTS for c in COLOURS for h in HEADINGS for r in range(3)
            for k in range(3)]


def draw_boat(pen: ImageDraw.ImageDraw, x: float, y: float, length: float, sail: tuple, heading: str):
    """A boat `length` long whose hull's middle is at (x, y): a dark hull pointed at the bow, a mast and a
    triangular sail of colour `sail` that leans back from the mast towards the stern."""
    d = 1 if heading == "right" else -1  # which way the bow points
    h = 0.18 * length
    stern, bow = x - d * length / 2, x + d * length / 2
    pen.polygon([(stern, y), (bow + d * 0.12 * length, y), (bow - d * 0.1 * length, y + h), (stern + d * 0.06 * length,
                y + h)], fill=(70, 45, 30))
    mast, top = x + d * 0.12 * length, y - 0.85 * length
    pen.line([(mast, y), (mast, top)], fill=(60, 50, 40), width=max(1, round(0.03 * length)))
    pen.polygon([(mast - d * 0.02 * length, top + 0.04 * length), (mast - d * 0.02 * length, y - 0.06 * length),
                 (mast - d * 0.5 * length, y - 0.06 * length)], fill=sail)


def draw(rng: random.Random, side: int = 128) -> tuple[Image.Image, str]:
    """One random picture and its caption."""
    count, colour, heading = rng.choice(list(COUNTS)), rng.choice(list(COLOURS)), rng.choice(HEADINGS)
    row, col = rng.randrange(3), rng.randrange(3)

    # the water: a random shade of blue, lighter wave strokes
    shade = rng.randint(-15, 15)
    water = tuple(v + shade for v in WATER)
    im = Image.new("RGB", (side, side), water)
    pen = ImageDraw.Draw(im)
    for _ in range(rng.randint(6, 14)):
        x, y, w = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(0.05, 0.12) * side
        pen.arc([x - w, y - w / 4, x + w, y + w / 4], 200, 340, fill=tuple(min(255, v + 45) for v in water), width=1)

    # the boats one above the other's stern, centred on the place (as a shape is in blip/tool/shapes.py)
    length = rng.uniform(*LENGTH) * side
    height = 1.05 * length  # sail top to keel
    jitter = side / 32
    cx = CENTRES[col] * side + rng.uniform(-jitter, jitter)
    cy = CENTRES[row] * side + rng.uniform(-jitter, jitter)
    gap = 0.25 * length
    width = count * length + (count - 1) * gap
    left = min(max(cx - width / 2, 1 + 0.12 * length), side - 1 - width - 0.12 * length)
    keel = min(max(cy + height / 2, height), side - 1)
    sail = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[colour])
    for i in range(count):
        draw_boat(pen, left + length / 2 + i * (length + gap), keel - 0.18 * length, length, sail, heading)
    return im, caption(count, colour, heading, row, col)


def main(argv=None) -> int:
    return shapes.data_set_main(argv, "Write a harbour captioning data set: train/, val/ and test/ folders of PNG "
                                "pictures of sailing boats, with metadata.jsonl captions (count, sail colour, "
                                "heading, place).", 256, draw, len(possible_captions()))


if __name__ == "__main__":
    sys.exit(main())
