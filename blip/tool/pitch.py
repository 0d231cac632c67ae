"""A second generated captioning data set, for transfer: players and a ball on a green pitch,
captioned with how many players, their shirt colour, and where they are ("two red players and a
ball at the top left").

It shares words and concepts with blip/tool/shapes.py (the shirt colours are shapes' six colours, the
places its 3 x 3 grid) and adds new ones: a player figure (a shirt with a head and legs), counting
one or two of them, "player"/"players", "ball", and a striped pitch in place of a grey background.
A model trained on shapes knows half of every caption; one trained from scratch on a few pitch
pictures has to learn all of it (transfer.py). Measured in designing it: on a dark green
pitch the shapes model saw one "large green square" in every picture, on this light one it reads
shirt colours and places from the start; with player sizes in the captions as well, two small
players were read as one large one, and smaller players were counted worse.

    python -m blip.tool.pitch data/pitch --train 256 --val 200 --test 200

writes `train/`, `val/` and `test/` folders of PNG pictures, each with a `metadata.jsonl` (`file_name`,
`text`), as blip/tool/shapes.py does.
"""

import random
import sys

from PIL import Image, ImageDraw

from . import shapes
from .shapes import CENTRES, COLOURS, place_name

COUNTS = {1: "one", 2: "two"}
HEIGHT = (0.3, 0.34)  # a player's height as a fraction of the picture side
SKINS = [(250, 215, 180), (205, 150, 110), (140, 95, 60)]
GRASS = (150, 200, 140)
BALL = 0.035  # ball radius as a fraction of the picture side


def caption(count: int, colour: str, row: int, col: int) -> str:
    """The one true caption of a picture: "one blue player and a ball on the left"."""
    players = "player" if count == 1 else "players"
    return f"{COUNTS[count]} {colour} {players} and a ball {place_name(row, col)}"


def possible_captions() -> list[str]:
    return [caption(n, c, r, k) for n in COUNTS for c in COLOURS for r in range(3) for k in range(3)]


def draw_player(pen: ImageDraw.ImageDraw, x: float, top: float, height: float, shirt: tuple, skin: tuple):
    """A standing figure `height` tall whose top is at `top`, centred on x: head, shirt, two legs."""
    h = height
    head, body_w = 0.13 * h, 0.42 * h
    pen.ellipse([x - head, top, x + head, top + 2 * head], fill=skin)
    pen.rounded_rectangle([x - body_w / 2, top + 0.27 * h, x + body_w / 2, top + 0.66 * h], radius=0.08 * h, fill=shirt)
    leg = max(1.0, 0.09 * h)
    for side in (-1, 1):
        lx = x + side * 0.11 * h
        pen.rectangle([lx - leg / 2, top + 0.64 * h, lx + leg / 2, top + h], fill=(35, 35, 40))


def draw(rng: random.Random, side: int = 128) -> tuple[Image.Image, str]:
    """One random picture and its caption."""
    count, colour = rng.choice(list(COUNTS)), rng.choice(list(COLOURS))
    row, col = rng.randrange(3), rng.randrange(3)

    # the pitch: mown stripes of two greens, a random phase and shade, and darker tufts
    shade = rng.randint(-15, 15)
    grass = tuple(v + shade for v in GRASS)
    im = Image.new("RGB", (side, side), grass)
    pen = ImageDraw.Draw(im)
    stripe, phase = side / 8, rng.uniform(0, side / 4)
    for k in range(-1, 9):
        x0 = phase + 2 * k * stripe
        pen.rectangle([x0, 0, x0 + stripe, side], fill=tuple(min(255, v + 12) for v in grass))
    for _ in range(rng.randint(0, 8)):
        x, y, r = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(1, 2.5) * side / 128
        pen.ellipse([x - r, y - r, x + r, y + r], fill=tuple(v - 25 for v in grass))

    # the players side by side, centred on the place (as a shape is in blip/tool/shapes.py); the ball at
    # their feet, on a random side where it fits
    height, ball = rng.uniform(*HEIGHT) * side, BALL * side
    body, gap = 0.42 * height, 0.3 * height
    width = count * body + (count - 1) * gap
    jitter = side / 32
    cx = CENTRES[col] * side + rng.uniform(-jitter, jitter)
    cy = CENTRES[row] * side + rng.uniform(-jitter, jitter)
    left = min(max(cx - width / 2, 1), side - 1 - width)
    top = min(max(cy - height / 2, 1), side - 1 - height)
    shirt = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[colour])
    skin = rng.choice(SKINS)
    for i in range(count):
        draw_player(pen, left + body / 2 + i * (body + gap), top, height, shirt, skin)
    room_left, room_right = left - gap - 2 * ball > 0, left + width + gap + 2 * ball < side
    on_left = room_left and (not room_right or rng.random() < 0.5)
    bx = left - gap / 2 - ball if on_left else left + width + gap / 2 + ball
    by = top + height - ball
    pen.ellipse([bx - ball, by - ball, bx + ball, by + ball], fill=(250, 250, 250))
    return im, caption(count, colour, row, col)


def main(argv=None) -> int:
    return shapes.data_set_main(argv, "Write a pitch captioning data set: train/, val/ and test/ folders of PNG "
                                "pictures of players and a ball, with metadata.jsonl captions (count, shirt colour, "
                                "place).",
                                256, draw, len(possible_captions()))


if __name__ == "__main__":
    sys.exit(main())
