"""Blend a fine-tuned model with the one it started from, to keep what that one knew (blip/tool/blend.py).

    python blend.py runs/football                       # the run's best/ against its --init, a = 0, 0.25, ..., 1
    python blend.py runs/football --keep 0.9            # the best on the new pictures that keeps 90% of the old
    python blend.py runs/football --alphas 0 0.5 0.6 0.7 1 --alpha 0.6 --out checkpoints/football-0.6

For each a, the weights (1 - a) * start + a * tuned are evaluated on the run's validation set and on every
--eval-data set it had (the pictures of what the model knew; more can be given here), and the curve is
printed. The chosen blend is written as a checkpoint folder (by default RUN/blend/) that caption.py takes,
with its scores and the whole curve in evaluation.json.
"""

import argparse
import sys
from pathlib import Path

from blip.checkpoint import CheckpointError, load_training_state
from blip.tool.blend import blend_run
from blip.tool.data import DataError, check_images, read_eval_set
from blip.tool.plan import validation_rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a train.py run folder (its last/ says what it trained on and from)")
    p.add_argument("--start", metavar="DIR", help="the checkpoint it started from (default: the run's --init)")
    p.add_argument("--tuned", metavar="DIR", help="the fine-tuned checkpoint (default: RUN/best)")
    p.add_argument("--eval-data", action="append", metavar="DIR", default=[],
                   help="pictures of what the start knew, besides the run's own --eval-data sets (repeatable)")
    p.add_argument("--alphas", nargs="+", type=float, default=[0, 0.25, 0.5, 0.75, 1.0],
                   help="the blends to evaluate (default: 0 0.25 0.5 0.75 1)")
    p.add_argument("--keep", type=float, metavar="F", help="choose the best on the validation set among the blends "
                   "that keep at least F\nof the start's CIDEr-D on every --eval-data set (default: the best on the "
                   "validation set)")
    p.add_argument("--alpha", type=float, help="write this blend (one of --alphas), whatever the curve")
    p.add_argument("--out", metavar="DIR", help="where the chosen blend goes (default: RUN/blend)")
    p.add_argument("--batch-size", type=int, default=16, help="pictures per evaluation batch (default: 16)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not all(0 <= a <= 1 for a in args.alphas) or args.alpha is not None and args.alpha not in args.alphas:
        p.error("--alphas must lie in [0, 1], and --alpha must be one of them")
    if args.keep is not None and 0 not in args.alphas:
        args.alphas = [0.0, *args.alphas]  # --keep compares with the start
    run = Path(args.run)
    try:
        saved = load_training_state(run / "last")[0]["args"]
        start = Path(args.start or saved["init"])
        if str(start) == "scratch":
            raise CheckpointError(f"{run} was trained from scratch: there is no start to blend with (give --start)")
        val = validation_rows(saved)
        extra = {Path(d).name: check_images(read_eval_set(d)).rows for d in [*saved.get("eval_data", []),
                                                                              *args.eval_data]}
        blend_run(start, Path(args.tuned or run / "best"), val, extra, sorted(set(args.alphas)), args.keep,
                  args.alpha, Path(args.out or run / "blend"), args.batch_size)
    except (CheckpointError, DataError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
