"""OUT/report.html: one self-contained page that says whether training worked.

Curves of the training loss, validation loss, BLEU-4, CIDEr-D and exact captions (inline SVG), and
for every evaluation a gallery of validation images (embedded JPEGs) with their reference and
predicted captions. No scripts, no files beside it: it opens anywhere, and can be mailed.
"""

import base64
import html
import io
import os
from pathlib import Path

from PIL import Image

from .metrics import tokenize

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def thumbnail(im: Image.Image, side: int = 160) -> str:
    """A small JPEG of `im` as a data: URL."""
    im = im.convert("RGB")
    im.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], width=420, height=220) -> str:
    """An SVG chart of (step, value) series on shared axes."""
    points = [p for s in series.values() for p in s]
    if not points:
        return ""
    left, right, top, bottom = 52, 10, 24, 28
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    y0, y1 = min(y for _, y in points), max(y for _, y in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9 + abs(y0) * 0.1 + 1e-3)

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y):
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
             f'<text x="{left}" y="14" font-weight="bold">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#ccc"/>']
    for y in (y0, (y0 + y1) / 2, y1):
        parts.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    for x in (x0, x1):
        parts.append(f'<text x="{sx(x):.1f}" y="{height - 10}" text-anchor="middle">{x:g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 1}" text-anchor="middle">step</text>')
    for i, (name, s) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        if len(s) < 60:
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="{colour}"/>' for x, y in s]
        parts.append(f'<text x="{width - right - 4}" y="{top + 14 + 13 * i}" text-anchor="end" fill="{colour}">'
                     f"{html.escape(name)}</text>")
    return "".join(parts) + "</svg>"


def gallery(entry: dict, images: list[str]) -> str:
    cards = []
    for shown, image in zip(entry.get("gallery", []), images, strict=False):
        refs = shown["references"]
        exact = tokenize(shown["prediction"]) in [tokenize(r) for r in refs]
        cards.append(
            f'<div class="card"><img src="{image}" alt="validation image">'
            f'<p class="{"good" if exact else "bad"}">{html.escape(shown["prediction"]) or "<i>(empty)</i>"}</p>'
            + "".join(f'<p class="ref">{html.escape(r)}</p>' for r in refs[:5]) + "</div>"
        )
    return '<div class="gallery">' + "".join(cards) + "</div>"


def write_report(out: Path, records: list[dict], images: list[str]):
    """Write OUT/report.html from the metrics records and the gallery's thumbnails (atomically)."""
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    others = list(dict.fromkeys(name for r in evals for name in r.get("eval_sets", {})))  # train.py --eval-data

    def series(metric: str) -> dict:  # the validation set's curve, then each --eval-data set's
        curves = {"validation": [(r["step"], r[metric]) for r in evals]}
        for name in others:
            curves[name] = [(r["step"], r["eval_sets"][name][metric]) for r in evals if name in r.get("eval_sets", {})]
        return curves

    charts = [
        # the same measure on both sides: training's loss without its label smoothing ("nll"), as validation's
        line_chart("loss (no label smoothing)", {"train": [(r["step"], r.get("nll", r["loss"])) for r in train],
                                                 **series("val_loss")}),
        line_chart("CIDEr-D", series("cider")),
        line_chart("BLEU-4", series("bleu4")),
        line_chart("exact captions", series("exact")),
    ]
    table = "".join(
        f"<tr><td>{r['step']}</td><td>{r['epoch']:g}</td><td>{r['val_loss']:.3f}</td><td>{r['bleu4']:.3f}</td>"
        f"<td>{r['cider']:.3f}</td><td>{r['exact']:.1%}</td>"
        + "".join(f"<td>{s['cider']:.3f}</td><td>{s['exact']:.1%}</td>" if (s := r.get("eval_sets", {}).get(n))
                  else "<td></td><td></td>" for n in others)
        + "</tr>" for r in evals
    )
    other_heads = "".join(f"<th>{html.escape(n)} CIDEr-D</th><th>{html.escape(n)} exact</th>" for n in others)
    sections = "".join(
        f'<details{" open" if i == len(evals) - 1 else ""}><summary>step {r["step"]} (epoch {r["epoch"]:g}): '
        f'CIDEr-D {r["cider"]:.3f}, exact {r["exact"]:.1%}</summary>{gallery(r, images)}</details>'
        for i, r in enumerate(evals)
    )
    best = max(evals, key=lambda r: r["cider"]) if evals else None
    summary = (f"best CIDEr-D {best['cider']:.3f} at step {best['step']} (OUT/best/)" if best else "no evaluation yet")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>BLIP training: {html.escape(out.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} .charts svg{{margin:0 1em 1em 0}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ddd;padding:2px 8px;text-align:right}}
.gallery{{display:flex;flex-wrap:wrap;gap:12px}} .card{{width:170px;font-size:12px}} .card img{{width:160px}}
.card p{{margin:2px 0}} .good{{color:#1a7f37;font-weight:bold}} .bad{{color:#b42318;font-weight:bold}}
.ref{{color:#555}} summary{{cursor:pointer;margin:6px 0}}</style></head><body>
<h1>BLIP training: {html.escape(str(out))}</h1><p>{summary}. Predicted captions are bold: green when equal to a
reference, red otherwise; references are grey.</p>
<div class="charts">{"".join(charts)}</div>
<h2>Evaluations</h2><table><tr><th>step</th><th>epoch</th><th>val loss</th><th>BLEU-4</th><th>CIDEr-D</th>
<th>exact</th>{other_heads}</tr>{table}</table>
<h2>Validation captions</h2>{sections}</body></html>
"""
    tmp = out / "report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out / "report.html")
