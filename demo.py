"""`make demo`: train a tiny BLIP captioner from scratch on generated pictures, on the CPU, in minutes.

    1. data/shapes: 800 training, 200 validation and 200 test pictures of one shape each, captioned with
       its size, colour, shape and place (blip/tool/shapes.py)
    2. train.py --init scratch --preset tiny --epochs 40, into runs/demo (progress bar, report), best/
       chosen on the validation pictures
    3. caption test pictures with best/, and print the test scores before and after training

What a trained model is worth on a new domain with few pictures is `make transfer` (transfer.py).
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import train
from blip.tool import shapes
from blip.tool.captioner import Captioner
from blip.tool.metrics import caption_scores


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/shapes", help="where the generated data set goes (default: data/shapes)")
    p.add_argument("--out", default="runs/demo", help="the training run's folder, replaced if it exists "
                   "(default: runs/demo)")
    p.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    t0 = time.perf_counter()

    if not (data / "test" / "metadata.jsonl").is_file():
        shapes.main([str(data)])
    if out.exists():
        print(f"removing the previous demo run in {out}")
        shutil.rmtree(out)
    code = train.main(["--data", str(data), "--out", str(out), "--init", "scratch", "--preset", "tiny",
                       "--epochs", str(args.epochs), "--eval-every", "200"])
    if code:
        return code

    test = [json.loads(line) for line in (data / "test" / "metadata.jsonl").read_text().splitlines()]
    captioner = Captioner.from_pretrained(out / "best", device="cpu")
    predictions = captioner.caption([data / "test" / r["file_name"] for r in test], "a picture of ", num_beams=3)
    print("\ntest pictures, captioned by the trained model (runs/demo/best):")
    for r, prediction in list(zip(test, predictions, strict=True))[:10]:
        mark = "ok " if prediction == r["text"] else "   "
        print(f"  {mark} {r['file_name']}: {prediction:44s} (true: {r['text']})")
    before = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    best = json.loads((out / "best" / "evaluation.json").read_text())
    rows = {"before training": ("validation", before), f"best/ (step {best['step']})": ("validation", best),
            "best/, test": ("test", caption_scores(predictions, [[r["text"]] for r in test]))}
    print("\nbeam search 3; best/ is chosen on the validation pictures, the test ones are for this report only:")
    print(f"  {'':22s} {'pictures':>10s} {'exact captions':>15s} {'CIDEr-D':>8s} {'BLEU-4':>7s}")
    for name, (split, r) in rows.items():
        print(f"  {name:22s} {split:>10s} {r['exact']:15.1%} {r['cider']:8.3f} {r['bleu4']:7.3f}")
    print(f"\nreport: {out / 'report.html'}   ({time.perf_counter() - t0:.0f} s in all)")
    print(f"caption your own pictures: .venv/bin/python caption.py PICTURE.png --checkpoint {out / 'best'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
