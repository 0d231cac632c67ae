"""Where the caption decoder looked for each word it wrote, drawn over the image.

`decoding.generate_from(..., attention=[])` keeps, for every new token, the decoder's
cross-attention probabilities over the image tokens from the same decoding run (the winning beam's,
in beam search). The choice of layers: all of them, averaged, and all heads, averaged: one map per
token that sums to 1 over the image tokens. Here the word pieces of a word are averaged into one
map, the class token is left out, the rest is laid on the patch grid and drawn as a heat map over
the image, one panel per word (pillow only).
"""

import torch
from PIL import Image, ImageDraw, ImageFont

from ..tokenizer import Tokenizer


def word_maps(tokenizer: Tokenizer, ids: list[int], maps: torch.Tensor, grid: int) -> tuple[list[str], torch.Tensor]:
    """ids: a caption's new token ids; maps: (len(ids), 1 + grid*grid) attention over the image
    tokens, class token first -> (words, (words, grid, grid) attention over the patches)."""
    words = tokenizer.words(ids)
    patches = maps[:, 1:].float()  # (tokens, grid*grid)
    per_word = [patches[positions].mean(dim=0) for _, positions in words]
    stacked = torch.stack(per_word) if per_word else patches[:0]
    return [w for w, _ in words], stacked.view(len(words), grid, grid)


def heat(value: float) -> tuple[int, int, int]:
    """0 -> dark blue, 0.5 -> red, 1 -> yellow."""
    if value < 0.5:
        t = value / 0.5
        return int(40 + 200 * t), 0, int(120 * (1 - t))
    t = (value - 0.5) / 0.5
    return 240, int(230 * t), 0


PALETTE = [c for i in range(256) for c in heat(i / 255)]  # PIL's flat r, g, b, r, g, b, ...


def draw(image: Image.Image, words: list[str], maps: torch.Tensor, panel: int = 160, columns: int = 5) -> Image.Image:
    """A grid of panels, one per word: the image (squared as the model saw it) under its heat map
    (each map scaled to its own maximum), the word above it."""
    font = ImageFont.load_default()
    label = 18
    rows = max(1, -(-len(words) // columns))
    sheet = Image.new("RGB", (columns * panel, rows * (panel + label)), "white")
    base = image.convert("RGB").resize((panel, panel), Image.Resampling.BICUBIC)
    pen = ImageDraw.Draw(sheet)
    for i, (word, m) in enumerate(zip(words, maps, strict=True)):
        scaled = (m / m.max().clamp_min(1e-12) * 255).round().byte().numpy()
        hot = Image.fromarray(scaled).resize((panel, panel), Image.Resampling.BICUBIC)
        colour = hot.convert("P")
        colour.putpalette(PALETTE)
        panel_image = Image.blend(base, colour.convert("RGB"), 0.55)
        x, y = (i % columns) * panel, (i // columns) * (panel + label)
        sheet.paste(panel_image, (x, y + label))
        pen.text((x + 4, y + 3), word, fill="black", font=font)
    return sheet
