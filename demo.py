"""`make demo`: train a tiny BLIP captioner from scratch on generated pictures, on the CPU, in minutes.

    1. data/shapes: 800 training and 200 held-out pictures of one shape each, captioned with its
       size, colour, shape and place (blip/shapes.py)
    2. train.py --init scratch --preset tiny --epochs 40, into runs/demo (progress bar, report)
    3. caption held-out pictures with the trained model; print the metrics before and after training
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import train
from blip import shapes
from blip.captioner import Captioner


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/shapes", help="where the generated data set goes (default: data/shapes)")
    p.add_argument("--out", default="runs/demo", help="the training run's folder, replaced if it exists "
                   "(default: runs/demo)")
    p.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    args = p.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    t0 = time.perf_counter()

    if not (data / "train" / "metadata.jsonl").is_file():
        shapes.main([str(data)])
    if out.exists():
        print(f"removing the previous demo run in {out}")
        shutil.rmtree(out)
    code = train.main(["--data", str(data), "--out", str(out), "--init", "scratch", "--preset", "tiny",
                       "--epochs", str(args.epochs), "--eval-every", "200"])
    if code:
        return code

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    before, after = evals[0], evals[-1]
    captioner = Captioner.from_pretrained(out / "best", device="cpu")
    val = [json.loads(line) for line in (data / "val" / "metadata.jsonl").read_text().splitlines()]
    held_out = val[:10]
    predictions = captioner.caption([data / "val" / r["file_name"] for r in held_out], "a picture of ", num_beams=3)

    print("\nheld-out pictures, captioned by the trained model (runs/demo/best):")
    for r, prediction in zip(held_out, predictions, strict=True):
        mark = "ok " if prediction == r["text"] else "   "
        print(f"  {mark} {r['file_name']}: {prediction:44s} (true: {r['text']})")
    print(f"\n{len(val)} held-out pictures, beam search 3:")
    print(f"  {'':18s} {'exact captions':>15s} {'CIDEr-D':>8s} {'BLEU-4':>7s}")
    for name, r in (("before training", before), (f"after {after['step']} steps", after)):
        print(f"  {name:18s} {r['exact']:15.1%} {r['cider']:8.3f} {r['bleu4']:7.3f}")
    print(f"\nreport: {out / 'report.html'}   ({time.perf_counter() - t0:.0f} s in all)")
    print(f"caption your own pictures: .venv/bin/python caption.py PICTURE.png --checkpoint {out / 'best'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
