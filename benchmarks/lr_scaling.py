"""How fine-tuning's learning rate scales with model width and batch: the measurement behind train.py's
default learning rate for small sets (blip/tool/plan.py).

For each preset (tiny, width 128; small, width 256), a shapes model is trained from scratch, then
fine-tuned on N pitch pictures (the transfer task of transfer.py) at each batch and each
learning rate lr = c x 128 / width, for the same number of epochs whatever the batch (the same
compute). Each run keeps its best evaluation on the pitch validation split; the table gives that
best validation exact-caption score and CIDEr-D. If the best c is the same at both widths, the
learning rate scales as 1 / width; the best c at each batch says how it scales with the batch.

    python benchmarks/lr_scaling.py                     # tiny and small, batches 8 and 32, N = 64
    python benchmarks/lr_scaling.py --presets tiny --batches 16 --cs 1e-3 --out runs/lr-quick

Every run is a train.py child process; OUT/runs.jsonl has a line per run, OUT/lr_scaling.md the table.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blip.tokenizer import Tokenizer  # noqa: E402
from blip.tool import harbour, pitch, shapes  # noqa: E402

WIDTH = {"tiny": 128, "small": 256}
PROMPT = "a picture of "


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(flags: list, log: Path, threads: int) -> float:
    """train.py in a child process; its wall time. Exits on failure, showing the log's end."""
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_MININTERVAL": "30"}
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, str(ROOT / "train.py"), *map(str, flags)], stdout=f,
                               stderr=subprocess.STDOUT, env=env)
    if code:
        sys.exit(f"train.py failed ({code}); its log: {log}\n{log.read_text()[-2000:]}")
    return time.perf_counter() - t0


def first_pictures(pool: Path, n: int, folder: Path):
    """`folder`/train: the first n pictures of `pool`/train; `folder`/val: `pool`/val."""
    rows = read_jsonl(pool / "train" / "metadata.jsonl")[:n]
    (folder / "train").mkdir(parents=True)
    for r in rows:
        shutil.copy(pool / "train" / r["file_name"], folder / "train" / r["file_name"])
    (folder / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(pool / "val", folder / "val")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=list(WIDTH), help="model sizes")
    p.add_argument("--batches", nargs="+", type=int, default=[8, 32], help="batch sizes (default: 8 32)")
    p.add_argument("--cs", nargs="+", type=float, default=[2.5e-4, 5e-4, 1e-3, 2e-3],
                   help="learning rates at width 128: lr = c x 128 / width (default: 2.5e-4 5e-4 1e-3 2e-3)")
    p.add_argument("--n", type=int, default=64, help="pitch pictures to fine-tune on (default: 64)")
    p.add_argument("--epochs", type=int, default=200, help="passes over them, at every batch (default: 200)")
    p.add_argument("--evals", type=int, default=8, help="evaluations per run, the best kept (default: 8)")
    p.add_argument("--dropout", type=float, default=0.0, help="text dropout of every fine-tune (default: 0, as the "
                   "rates in docs/performance.md were measured; train.py's small-set default is 0.3)")
    p.add_argument("--threads", type=int, default=1, help="threads per train.py (default: 1)")
    p.add_argument("--jobs", type=int, default=2, help="train.py runs at a time (default: 2)")
    p.add_argument("--out", default="runs/lr-scaling", help="where data, runs and the table go")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "tokenizer.json").is_file():  # one vocabulary for every domain, as BERT's covers any caption
        shapes.main([str(data / "shapes"), "--test", "0"])
        pitch.main([str(data / "pitch"), "--train", "256", "--val", "200", "--test", "0"])
        texts = [PROMPT] + [c for c in pitch.possible_captions() + harbour.possible_captions()]
        texts += [r["text"] for r in read_jsonl(data / "shapes" / "train" / "metadata.jsonl")]
        Tokenizer.train(texts, 1000).save(data / "tokenizer.json")
    task = data / f"pitch-{args.n}"
    if not task.exists():
        first_pictures(data / "pitch", args.n, task)
    done = {(r["preset"], r["batch"], r["c"]) for r in read_jsonl(out / "runs.jsonl")} \
        if (out / "runs.jsonl").exists() else set()
    for preset in args.presets:
        source = out / f"shapes-{preset}"
        if not (source / "best").is_dir():
            print(f"training the {preset} shapes model from scratch", flush=True)
            train(["--data", data / "shapes", "--out", source, "--init", "scratch", "--preset", preset,
                   "--tokenizer", data / "tokenizer.json", "--epochs", 40, "--eval-every", 500,
                   "--lr", 2e-3 * 128 / WIDTH[preset]], out / f"shapes-{preset}.log", args.threads * args.jobs)

    def sweep(preset: str, batch: int, c: float):
        scale = 128 / WIDTH[preset]
        steps = args.epochs * args.n // batch
        run = out / f"{preset}-b{batch}-c{c:g}"
        shutil.rmtree(run, ignore_errors=True)
        wall = train(["--data", task, "--out", run, "--init", out / f"shapes-{preset}" / "best", "--max-steps", steps,
                      "--eval-every", steps // args.evals, "--patience", 0, "--batch-size", batch, "--lr", c * scale,
                      "--vision-lr-scale", 0.3, "--augment", "flip", "--dropout", args.dropout],
                     out / f"{run.name}.log", args.threads)
        evals = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "eval"]
        best = max(evals, key=lambda r: r["cider"])
        row = {"preset": preset, "width": WIDTH[preset], "batch": batch, "c": c, "lr": c * scale,
               "steps": steps, "best_step": best["step"], "exact": best["exact"], "cider": best["cider"],
               "wall_s": round(wall)}
        with open(out / "runs.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        shutil.rmtree(run / "last", ignore_errors=True)  # keep the metrics, not the weights

    todo = [(p, b, c) for p in args.presets for b in args.batches for c in args.cs if (p, b, c) not in done]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # the work is in train.py child processes
        for future in [pool.submit(sweep, *t) for t in todo]:
            future.result()
    rows = read_jsonl(out / "runs.jsonl")
    lines = ["| preset (width) | batch | c | lr | best val exact | best val CIDEr-D | best at step / steps |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["width"], r["batch"], r["c"])):
        lines.append(f"| {r['preset']} ({r['width']}) | {r['batch']} | {r['c']:g} | {r['lr']:.3g} | {r['exact']:.1%} "
                     f"| {r['cider']:.3f} | {r['best_step']} / {r['steps']} |")
    (out / "lr_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
