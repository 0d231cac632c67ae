"""Whole processes, as a user runs them: `python caption.py ...` against the shortest HF script that does
the same (import transformers, `from_pretrained`, `BlipProcessor`, `generate`), same weights.

    python benchmarks/bench_cli.py [--repeats 3] [--threads 2] [--dtype fp32] [--packed-linear]

Builds a base-size model with random weights: an HF snapshot (model and a BlipProcessor whose WordPiece
vocabulary has BERT's 30522 entries) and our folder converted from it by convert_weights.py, and 8 photos
(640 x 480 JPEG). Then each case runs --repeats times, ours and HF alternated, each in a fresh process:

  (a) one photo, default settings: beam 3, 5 to 20 new tokens, prompt "a picture of "
  (b) 8 photos (a folder), beam 3, exactly 20 new tokens, one batch of 8

For each child: wall time from start to exit, time to its first caption line, and peak RSS (the
child's own, from a small launcher process: see LAUNCH). Medians are printed with the ratios HF / ours
(time) and ours / HF (memory).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

# HF's side: what its model card shows, with the settings of each case
HF_SCRIPT = """
import sys
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor
folder, beams, min_new, max_new, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
paths = sys.argv[6:]
import torch
model = BlipForConditionalGeneration.from_pretrained(folder, torch_dtype=getattr(torch, dtype)).eval()
processor = BlipProcessor.from_pretrained(folder)
images = [Image.open(p).convert("RGB") for p in paths]
inputs = processor(images, ["a picture of"] * len(images), return_tensors="pt").to(model.dtype)
with torch.inference_mode():
    out = model.generate(**inputs, num_beams=beams, min_new_tokens=min_new, max_new_tokens=max_new)
for p, ids in zip(paths, out):
    print(f"{p}: {processor.decode(ids, skip_special_tokens=True)}", flush=True)
"""


def make_vocab(path: Path):
    """A WordPiece vocabulary with BERT's size and special-token ids ([PAD] 0, [UNK] 100, [CLS] 101,
    [SEP] 102, [MASK] 103), characters, a few words, and filler words."""
    words = [f"[unused{i}]" for i in range(99)]
    words = ["[PAD]", *words, "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127)]
    words += chars + ["##" + c for c in chars] + ["picture", "of", "photo", "dog", "cat", "on", "the"]
    words += [f"word{i}" for i in range(30522 - len(words))]
    path.write_text("".join(w + "\n" for w in words))


def build(tmp: Path):
    """HF snapshot, our converted folder, and 8 photos under `tmp`."""
    from common import hf_model
    from transformers import BertTokenizerFast, BlipImageProcessor, BlipProcessor

    make_vocab(tmp / "vocab.txt")
    tokenizer = BertTokenizerFast(str(tmp / "vocab.txt"), bos_token="[DEC]", additional_special_tokens=["[ENC]"])
    hf_model("base").save_pretrained(tmp / "hf")
    BlipProcessor(BlipImageProcessor(), tokenizer).save_pretrained(tmp / "hf")
    subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), str(tmp / "hf"), str(tmp / "ours")],
                   check=True, stdout=subprocess.DEVNULL)
    photos = tmp / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):  # smooth colour fields with noise: JPEG-sized like a photo
        y, x = np.mgrid[0:480, 0:640] / 640
        base = np.stack([np.sin(x * (3 + i)), np.cos(y * (2 + i)), np.sin((x + y) * 4)], -1) * 100 + 128
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(photos / f"photo{i}.jpg", quality=90)
    return tmp / "hf", tmp / "ours", sorted(photos.iterdir())


# our side with the packed oneDNN path on (blip/linear.py), as it runs by default on non-Intel CPUs
PACKED = """
import runpy, sys
from blip import linear
linear.ONEDNN = linear.AVAILABLE
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# Each child is started by this small process, which reports the child's start time and peak RSS. Linux
# carries a process's peak RSS across exec, so a child forked straight from this benchmark (which holds
# the models it built, 1.6 GB) would report at least that much whatever it used itself.
LAUNCH = """
import json, resource, subprocess, sys, time
start = time.time()
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"start": start, "end": time.time(), "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, f)
sys.exit(code)
"""


def run(cmd: list[str], env: dict) -> dict:
    """One child process: wall time, time to its first output line, peak RSS, exit code."""
    with tempfile.TemporaryFile("w+") as err, tempfile.NamedTemporaryFile("r") as report:
        # stderr to a file, not a pipe: a chatty stderr cannot block the child
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, report.name, *cmd], stdout=subprocess.PIPE,
                                stderr=err, env=env, text=True, cwd=ROOT)
        first, lines = None, []
        for line in proc.stdout:
            if first is None:
                first = time.time()
            lines.append(line)
        if proc.wait() != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd[:3])} ... failed:\n{err.read()[-2000:]}")
        child = json.load(report)
    first = first if first is not None else child["end"]  # no output: the end is when it would have come
    return {"wall": child["end"] - child["start"], "first": first - child["start"],
            "rss": child["rss"] * 1024 / 2**30, "lines": lines}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs of each side per case (median reported)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of both children (default: 2)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and activations of both sides")
    p.add_argument("--packed-linear", action="store_true",
                   help="run ours with the packed oneDNN linear path, as on AMD CPUs, also where it is not the "
                        "default (Intel CPUs)")
    args = p.parse_args()
    ours_cmd = [sys.executable, "-c", PACKED, "caption.py"] if args.packed_linear else [sys.executable, "caption.py"]
    tmp = Path(tempfile.mkdtemp(prefix="bench_cli_"))
    try:
        hf, ours, photos = build(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
        torch_dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
        cases = {
            "(a) 1 photo, defaults": (
                [*ours_cmd, str(photos[0]), "--checkpoint", str(ours), "--dtype", args.dtype],
                [sys.executable, "-c", HF_SCRIPT, str(hf), "3", "5", "20", torch_dtype, str(photos[0])]),
            "(b) 8 photos, beam 3, 20 tokens": (
                [*ours_cmd, str(photos[0].parent), "--checkpoint", str(ours), "--beams", "3",
                 "--min-length", "20", "--max-length", "20", "--batch-size", "8", "--dtype", args.dtype],
                [sys.executable, "-c", HF_SCRIPT, str(hf), "3", "20", "20", torch_dtype, *map(str, photos)]),
        }
        results = {}
        for name, (cmd_ours, cmd_hf) in cases.items():
            runs = {"ours": [], "HF": []}
            for _ in range(args.repeats):
                runs["ours"].append(run(cmd_ours, env))
                runs["HF"].append(run(cmd_hf, env))
            results[name] = runs
    finally:
        shutil.rmtree(tmp)

    import torch

    linear = "packed oneDNN linear" if args.packed_linear else "linear: this CPU's default"
    print(f"base, cpu {args.dtype}, {linear}, OMP_NUM_THREADS={args.threads}, torch {torch.__version__}, "
          f"whole processes, "
          f"median of {args.repeats}, ours and HF alternated")
    print(f"{'':32s} {'wall ours':>9s} {'HF':>7s} {'HF/ours':>8s} | {'1st line ours':>13s} {'HF':>6s} | "
          f"{'peak RSS ours':>13s} {'HF':>6s} {'ours/HF':>8s}")
    for name, runs in results.items():
        med = {side: {k: statistics.median(r[k] for r in rs) for k in ("wall", "first", "rss")}
               for side, rs in runs.items()}
        o, h = med["ours"], med["HF"]
        print(f"{name:32s} {o['wall']:8.2f}s {h['wall']:6.2f}s {h['wall'] / o['wall']:7.2f}x | "
              f"{o['first']:12.2f}s {h['first']:5.2f}s | "
              f"{o['rss']:12.2f}G {h['rss']:5.2f}G {o['rss'] / h['rss']:7.2f}x")
        walls = {side: ", ".join(f"{r['wall']:.2f}" for r in rs) for side, rs in runs.items()}
        print(f"{'':32s} runs: ours {walls['ours']}; HF {walls['HF']}")


if __name__ == "__main__":
    main()
