"""train.py's stages and where they meet: a run writes what it wrote before the loop was split into stages
(a recorded reference), --init of a LoRA run trains every weight, LoRA targets are never rewritten,
--resume refuses what it cannot change and takes what it can, and a save killed at any of its file
operations leaves last/ and best/ loadable, each with the metrics of its own weights."""

import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import FAST, shapes_data, train_main

import train
from blip import BlipCaptioner
from blip.checkpoint import load_training_state, read_evaluation
from blip.tool import shapes
from blip.tool.captioner import Captioner
from blip.tool.metrics import caption_scores

REFERENCE = Path(__file__).parent / "data" / "train_reference.json"
PROMPT = "a picture of "


def reference_runs(root: Path) -> dict[str, list]:
    """The runs the reference records: from scratch (dropout, micro-batches, an --eval-data set), then
    a frozen ViT on cached image tokens from its last/."""
    rng = random.Random(0)
    data = root / "data"
    shapes.write_split(data / "train", 24, rng, side=64)
    shapes.write_split(data / "val", 4, rng, side=64)
    shapes.write_split(root / "other" / "val", 3, random.Random(9), side=64)
    return {
        "scratch": ["--data", data, *FAST, "--batch-size", 8, "--max-steps", 6, "--eval-every", 3, "--dropout", 0.1,
                    "--grad-accum", 2, "--eval-data", root / "other"],
        "cached": ["--data", data, "--init", root / "scratch" / "last", "--freeze-vision", "--cache-image-tokens",
                   "--augment", "flip", "--log-every", 1, "--num-beams", 1, "--batch-size", 8, "--max-steps", 6,
                   "--eval-every", 3, "--lr", 1e-3],
    }


def digest(out: Path) -> dict:
    """What a run wrote, as numbers that do not depend on where it ran: the files, every metrics record
    (timings left out), and each checkpoint tensor's sum and sum of squares."""
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    records = [{k: v for k, v in r.items() if k not in ("elapsed_s", "images_per_s")}
               for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    tensors = {}
    for folder in ("best", "last"):
        for k, v in load_file(str(out / folder / "model.safetensors")).items():
            v = v.double()
            tensors[f"{folder}/{k}"] = [v.sum().item(), v.square().sum().item()]
    return {"files": files, "records": records, "tensors": tensors}


def close(a, b, where: str):
    """Equal structure; numbers equal to 1e-4 relative (other CPUs sum in other orders)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, str):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), where
    else:
        assert a == b, where


def test_a_run_writes_what_it_wrote_before_the_split(tmp_path):
    """The reference was recorded by train.py as it was before its loop was cut into stages (one main of
    383 lines): the same seed gives the same files, metrics and weights."""
    reference = json.loads(REFERENCE.read_text())
    for name, flags in reference_runs(tmp_path).items():
        assert train_main(*flags, "--out", tmp_path / name) == 0
        got = digest(tmp_path / name)
        got["files"] = [f for f in got["files"] if f != "best/evaluation.json"]  # new: best/'s own scores
        close(reference[name], got, name)
    assert read_evaluation(tmp_path / "scratch" / "best")["step"] in (0, 3, 6)


if __name__ == "__main__":  # records the reference (run once, by the train.py it describes)
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = reference_runs(root)
        for name, flags in runs.items():
            assert train.main([str(f) for f in [*flags, "--out", root / name]]) == 0
        REFERENCE.write_text(json.dumps({name: digest(root / name) for name in runs}, indent=0) + "\n")
    sys.exit(0)
