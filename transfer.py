"""`make transfer`: what a trained captioner is worth on a new domain with few pictures, and what it keeps.

A shapes model (the demo's recipe, blip/tool/shapes.py) is fine-tuned on N pictures of a new domain with
train.py's defaults (the small-set plan, blip/tool/plan.py) in each of the ways of MODES, against the same
pictures learned from scratch, over several seeds. best/ is chosen on each domain's validation split; every
score in the table is on its test split, which no run trained or chose on, for the new domain and for shapes
(what the model forgets). The recipe was chosen on pitch (blip/tool/pitch.py); harbour (blip/tool/harbour.py)
played no part in choosing it and checks it unchanged.

    python transfer.py                       # the whole table, into runs/transfer/transfer.md (about an hour)
    python transfer.py --sizes 64 --seeds 3 --modes full scratch --domains harbour
    python transfer.py --quick               # a small pass over every mode, to see that it runs

Runs go two at a time (--jobs), each a train.py child process on one thread, so that its wall time and peak
memory are its own.
"""

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from blip.tokenizer import Tokenizer
from blip.tool import harbour, pitch, plan, shapes
from blip.tool.blend import ALPHAS, blend_run
from blip.tool.captioner import Captioner
from blip.tool.data import check_images, read_folder
from blip.tool.metrics import caption_scores
from blip.tool.plan import small_set_steps

ROOT = Path(__file__).resolve().parent
DOMAINS = {"pitch": pitch, "harbour": harbour}
PROMPT = "a picture of "
POOL, VAL, TEST = 256, 100, 200  # a domain's training pictures to draw N from, validation and test pictures
SHAPES_EPOCHS = 40  # the shapes model: the demo's recipe
# LoRA's rank, chosen on pitch validation pictures (N = 64, seeds 0-2, best/ by CIDEr-D): exact 83.0% at rank 8,
# 84.0% at 16, 86.0% at 64 (full fine-tune's rate x LORA_LR_SCALE, default targets, alpha = 2 x rank)
LORA_RANK = 64
SCRATCH_LR = 2e-3  # train.py's rate from scratch, for its batch of 32 (the demo's recipe)
# scratch's text dropout, chosen as the fine-tune's (blip/tool/plan.py DROPOUT) on pitch validation, N = 64, seeds
# 0-2: exact 64.7% at 0, 69.3% at 0.1, 69.0% at 0.2, 71.7% at 0.3, 72.0% at 0.4; with the fine-tune's rule of
# where it applies (small_set_dropout)
SCRATCH_DROPOUT = 0.4
KEEP = 0.8  # blends keep at least this share of the shapes model's CIDEr-D on shapes
# extra train.py flags of each mode; every fine-tune starts from the shapes model with no other flag than
# these (train.py's defaults: the small-set plan) and --eval-data shapes, so that forgetting is measured
MODES = {
    "full": [],
    "cached": ["--freeze-vision", "--cache-image-tokens"],
    "lora": ["--lora", str(LORA_RANK)],
    "full+replay": ["--replay", "{replay}"],
    "scratch": ["--init", "scratch", "--preset", "tiny"],  # with the full fine-tune's budget: see job_flags
}
# blends of a mode's best/ with the shapes model (blend.py), the best on the new domain's validation pictures
# that keeps KEEP of the shapes model's CIDEr-D on the shapes validation pictures
DERIVED = {"full+blend": "full", "lora+blend": "lora", "replay+blend": "full+replay"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# train.py is started by this small process, which writes its peak RSS to argv[1]: Linux carries a process's
# peak RSS across exec, so a child forked straight from transfer.py (which holds the captioners it scores
# with) would report at least transfer.py's own memory
LAUNCH = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def run_train(flags: list, log: Path, threads: int) -> dict:
    """train.py in a child process: exit code, wall time, and its own peak RSS (MB)."""
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_MININTERVAL": "30"}
    report = log.with_suffix(".rss")
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, "-c", LAUNCH, str(report), sys.executable, str(ROOT / "train.py"),
                                *map(str, flags)], stdout=f, stderr=subprocess.STDOUT, env=env)
    rss_kb = int(report.read_text()) if report.is_file() else 0  # ru_maxrss is in KB on Linux
    report.unlink(missing_ok=True)
    return {"code": code, "wall_s": time.perf_counter() - t0, "rss_mb": rss_kb / 1024,
            "log": log.read_text(errors="replace")}


def test_scores(checkpoint: Path, split: Path) -> dict:
    """exact and CIDEr-D of `checkpoint`'s captions (its own decoding defaults) of a test split."""
    rows = read_jsonl(split / "metadata.jsonl")
    captioner = Captioner.from_pretrained(checkpoint, device="cpu")
    predictions = captioner.caption([split / r["file_name"] for r in rows], PROMPT)
    return caption_scores(predictions, [[r["text"]] for r in rows])


def subset(pool: Path, n: int, seed: int, folder: Path) -> Path:
    """`folder`/train: n pictures of `pool`/train drawn by `seed`; `folder`/val: `pool`/val."""
    rows = random.Random(seed).sample(read_jsonl(pool / "train" / "metadata.jsonl"), n)
    (folder / "train").mkdir(parents=True)
    for r in rows:
        shutil.copy(pool / "train" / r["file_name"], folder / "train" / r["file_name"])
    (folder / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(pool / "val", folder / "val")
    return folder


def prepare(root: Path, threads: int, epochs: int = SHAPES_EPOCHS) -> dict:
    """The data, the shared vocabulary, the shapes model, and a replay set: pictures of shapes the model has
    not seen, captioned by the shapes model itself (as a user without its training data would make one)."""
    data = root / "data"
    paths = {"root": root, "shapes": data / "shapes", "vocab": data / "tokenizer.json",
             "source": root / "shapes" / "best", "replay": data / "replay"}
    if not paths["vocab"].is_file():
        shapes.main([str(data / "shapes"), "--val", str(VAL), "--test", str(TEST)])
        for name, module in DOMAINS.items():
            module.main([str(data / name), "--train", str(POOL), "--val", str(VAL), "--test", str(TEST)])
        # one vocabulary for every domain's words, as BERT's covers any English caption
        texts = [PROMPT] + [r["text"] for r in read_jsonl(data / "shapes" / "train" / "metadata.jsonl")]
        texts += pitch.possible_captions() + harbour.possible_captions()
        Tokenizer.train(texts, 1000).save(paths["vocab"])
    if not (paths["source"] / "model.safetensors").is_file():
        print("training the shapes model from scratch (the demo's recipe)", flush=True)
        done = run_train(["--data", paths["shapes"], "--out", root / "shapes", "--init", "scratch", "--preset", "tiny",
                          "--tokenizer", paths["vocab"], "--epochs", epochs, "--eval-every", 200],
                         root / "shapes.log", threads)
        if done["code"]:
            sys.exit(f"the shapes model failed; its log: {root / 'shapes.log'}")
    if not (paths["replay"] / "metadata.jsonl").is_file():
        shapes.write_split(paths["replay"], 256, random.Random(1), side=128)  # other pictures than the model's
        (paths["replay"] / "metadata.jsonl").unlink()  # their true captions are not used: the model's own are
        subprocess.check_call([sys.executable, str(ROOT / "caption.py"), str(paths["replay"]), "--checkpoint",
                               str(paths["source"]), "--sidecar"], stdout=subprocess.DEVNULL)
    return paths


def job_flags(paths: dict, domain: str, n: int, seed: int, mode: str, out: Path, folder: Path) -> list:
    flags = ["--data", folder, "--out", out, "--init", paths["source"], "--tokenizer", paths["vocab"],
             "--eval-data", paths["shapes"], "--seed", seed]
    flags += [paths["replay"] if f == "{replay}" else f for f in MODES[mode]]
    if mode == "scratch":  # the fine-tune's budget, batch and patience; scratch's own rate (at that batch) and dropout
        batch = min(plan.BATCH, n)
        steps = small_set_steps(n, batch)
        flags += ["--batch-size", batch, "--max-steps", steps, "--eval-every", max(1, steps // 10),
                  "--patience", plan.PATIENCE, "--lr", SCRATCH_LR * batch / 32,
                  "--dropout", plan.small_set_dropout(steps * batch / n, False, SCRATCH_DROPOUT)]
    return flags


def job(paths: dict, domain: str, n: int, seed: int, mode: str, threads: int) -> list[dict]:
    """One run (and the blends made from it): rows of the table."""
    root = paths["root"]
    name = f"{domain}-{n}-s{seed}-{mode}"
    folder = root / "sets" / f"{domain}-{n}-s{seed}"  # made by main, before the jobs start
    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    done = run_train(job_flags(paths, domain, n, seed, mode, out, folder), root / f"{name}.log", threads)
    if done["code"]:
        return [{"name": name, "failed": f"exit code {done['code']}, log {root / f'{name}.log'}"}]
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"]
    best = json.loads((out / "best" / "evaluation.json").read_text())
    files = out / "best"
    row = {"domain": domain, "n": n, "seed": seed, "mode": mode, "best_step": best["step"],
           "steps": max(r["step"] for r in evals), "wall_s": done["wall_s"], "rss_mb": done["rss_mb"],
           "trainable_m": float(done["log"].split("training ", 1)[1].split()[0]),
           "adapter_mb": (files / "adapter.safetensors").stat().st_size / 1e6
           if (files / "adapter.safetensors").exists() else None}
    rows = [{**row, "new": test_scores(files, root / "data" / domain / "test"),
             "shapes": test_scores(files, root / "data" / "shapes" / "test")}]
    for derived, source in DERIVED.items():
        if source != mode:
            continue
        val = check_images(read_folder(folder / "val")).rows
        old = {"shapes": check_images(read_folder(paths["shapes"] / "val")).rows}
        chosen = blend_run(paths["source"], files, val, old, list(ALPHAS), KEEP, None, out / "blend", 16,
                           say=lambda _: None)
        rows.append({**row, "mode": derived, "alpha": chosen["alpha"],
                     "new": test_scores(out / "blend", root / "data" / domain / "test"),
                     "shapes": test_scores(out / "blend", root / "data" / "shapes" / "test")})
    shutil.rmtree(out / "last", ignore_errors=True)  # keep best/ and the metrics, not the loop state
    return rows


def spread(values: list[float], percent: bool) -> str:
    """mean [min-max] of the seeds (just the value for one)."""
    f = (lambda v: f"{100 * v:.1f}") if percent else (lambda v: f"{v:.2f}")
    mean = f(statistics.mean(values)) + ("%" if percent else "")
    return mean if len(values) == 1 else f"{mean} [{f(min(values))}-{f(max(values))}]"


def table(rows: list[dict], source: dict) -> str:
    lines = [f"Test splits ({TEST} pictures each, never trained or chosen on); mean [min-max] over seeds; "
             f"the shapes model itself: shapes exact {source['shapes']['exact']:.1%}, CIDEr-D "
             f"{source['shapes']['cider']:.2f}.\n",
             "| domain | N | mode | seeds | new exact | new CIDEr-D | shapes exact | shapes CIDEr-D "
             "| best step / steps | wall s | peak RSS MB | trainable M | adapter MB |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    groups = {}
    for r in rows:
        groups.setdefault((r["domain"], r["n"], r["mode"]), []).append(r)
    order = list(MODES) + list(DERIVED)
    for (domain, n, mode), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "pitch", kv[0][0], kv[0][1],
                                                                        order.index(kv[0][2]))):
        adapter = rs[0]["adapter_mb"]
        mean = {k: statistics.mean(r[k] for r in rs) for k in ("best_step", "steps", "wall_s", "rss_mb")}
        lines.append(f"| {domain} | {n} | {mode} | {len(rs)} | {spread([r['new']['exact'] for r in rs], True)} "
                     f"| {spread([r['new']['cider'] for r in rs], False)} "
                     f"| {spread([r['shapes']['exact'] for r in rs], True)} "
                     f"| {spread([r['shapes']['cider'] for r in rs], False)} "
                     f"| {mean['best_step']:.0f} / {mean['steps']:.0f} | {mean['wall_s']:.0f} | {mean['rss_mb']:.0f} "
                     f"| {rs[0]['trainable_m']:.2f} | {f'{adapter:.2f}' if adapter else '-'} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/transfer", help="where data, runs and transfer.md go (default: "
                   "runs/transfer); runs already in its results.jsonl are not run again")
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS), help="new domains")
    p.add_argument("--sizes", nargs="+", type=int, default=[16, 64, 256], help="N: pictures to learn from")
    p.add_argument("--seeds", type=int, default=3, help="seeds at N = 64 (default: 3; one at other sizes)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="ways to learn")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default: 2)")
    p.add_argument("--quick", action="store_true", help="N = 16 only, one seed, a shapes model of 2 epochs: to see "
                   "that every mode runs")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.seeds = [16], 1
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = prepare(root, threads=2, epochs=2 if args.quick else SHAPES_EPOCHS)
    if args.jobs > 1:
        torch.set_num_threads(1)  # the test scores and blends of parallel runs, in this process
    results = root / "results.jsonl"
    done = {(r["domain"], r["n"], r["seed"], r["mode"]) for r in read_jsonl(results)} if results.exists() else set()
    todo = [(d, n, s, m) for d in args.domains for n in args.sizes for s in range(args.seeds if n == 64 else 1)
            for m in args.modes if (d, n, s, m) not in done]
    for domain, n, seed in dict.fromkeys((d, n, s) for d, n, s, _ in todo):
        if not (root / "sets" / f"{domain}-{n}-s{seed}").exists():
            subset(root / "data" / domain, n, seed, root / "sets" / f"{domain}-{n}-s{seed}")
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # each job's work is a child process's
        futures = {pool.submit(job, paths, *t, 1): t for t in todo}
        for future in concurrent.futures.as_completed(futures):
            for row in future.result():
                if "failed" in row:
                    print(f"{row['name']} failed: {row['failed']}", flush=True)
                    continue
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{row['domain']} N={row['n']} seed {row['seed']} {row['mode']:12s} new exact "
                      f"{row['new']['exact']:6.1%}  shapes exact {row['shapes']['exact']:6.1%}  "
                      f"({row['wall_s']:.0f} s)", flush=True)
    source = {"shapes": test_scores(paths["source"], root / "data" / "shapes" / "test")}
    text = table(read_jsonl(results), source)
    (root / "transfer.md").write_text(text)
    print("\n" + text + f"\n{time.perf_counter() - t0:.0f} s; table: {root / 'transfer.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
