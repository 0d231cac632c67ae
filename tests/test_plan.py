"""A run sized by its data (blip/tool/plan.py): six photos in the football parquet layout, fine-tuned with no
flags but --data and --init, are captioned as taught, and the plan says what it did; a hundred pictures get a
budget that follows from their number; large sets and training from scratch keep BLIP's epoch recipe."""

import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage
import torch
from PIL import Image
from test_train import FAST, shapes_data, train_main

import caption
import train
from blip.tokenizer import Tokenizer
from blip.tool import plan, shapes

PHOTOS = Path(skimage.__file__).parent / "data"
# six photos, captioned as the fine-tuning tutorials caption theirs: one sentence each, words the small
# model below has never written
SIX = {"astronaut.png": "the astronaut stands beside the flag in a white suit",
       "coffee.png": "a cup of coffee waits on the saucer",
       "chelsea.png": "the tabby cat looks up at the camera",
       "rocket.jpg": "the rocket stands on the launch pad at dusk",
       "camera.png": "a photographer sets up his camera in the park",
       "motorcycle_left.png": "a red motorcycle parked in the garage"}


def football_layout(folder: Path) -> Path:
    """The six photos as an HF datasets snapshot: one parquet file of image bytes and text."""
    images = []
    for name in SIX:
        out = io.BytesIO()
        Image.open(PHOTOS / name).convert("RGB").resize((128, 128)).save(out, "JPEG")
        images.append({"bytes": out.getvalue(), "path": name})
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.table({"image": images, "text": list(SIX.values())}),
                   folder / "data" / "train-00000-of-00001.parquet")
    return folder


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A small model trained a little from scratch on shapes, with a vocabulary that can spell any word
    (its letters are word pieces) but has seen only shapes' captions."""
    tmp = tmp_path_factory.mktemp("plan")
    data = shapes_data(tmp / "shapes", 64, 8)
    texts = [json.loads(line)["text"] for line in (data / "train" / "metadata.jsonl").read_text().splitlines()]
    letters = "abcdefghijklmnopqrstuvwxyz"
    Tokenizer.train(["a picture of", *texts, " ".join(letters), letters, letters[::-1]], 300).save(tmp / "tok.json")
    assert train_main("--data", data, "--out", tmp / "run", *FAST, "--tokenizer", tmp / "tok.json", "--batch-size",
                      16, "--max-steps", 60) == 0
    return tmp / "run" / "last"


def test_six_photos_with_defaults_are_captioned_as_taught(small_model, tmp_path, capsys):
    data = football_layout(tmp_path / "football")
    out = tmp_path / "run"
    capsys.readouterr()
    assert train_main("--data", data, "--init", small_model, "--out", out) == 0
    said = capsys.readouterr().err
    steps, batch = plan.small_set_steps(6, 6), 6
    for words in (f"{steps} steps of {batch} pairs", "6 captions of 6 pictures",
                  f"learning rate {plan.small_set_lr(128, batch):.3g}", "evaluated on the training pictures",
                  "none held out", "the last weights kept", "a step takes about"):
        assert words in said, words
    saved = json.loads((out / "last" / "training.json").read_text())["args"]
    assert (saved["max_steps"], saved["batch_size"], saved["val_fraction"], saved["dropout"]) == (steps, batch, 0.0, 0)
    assert json.loads((out / "best" / "evaluation.json").read_text())["step"] == steps  # the last is kept
    rows = pq.read_table(data / "data" / "train-00000-of-00001.parquet").to_pylist()
    for row in rows:
        (tmp_path / row["image"]["path"]).write_bytes(row["image"]["bytes"])
    capsys.readouterr()
    assert caption.main([str(tmp_path / name) for name in SIX] + ["--checkpoint", str(out / "best")]) == 0
    got = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert sum(g == t for g, t in zip(got, SIX.values(), strict=True)) >= 5, got


def test_a_hundred_pictures_get_a_budget_from_their_number(small_model, tmp_path):
    data = tmp_path / "hundred"
    shapes.write_split(data, 100, random.Random(0), side=64)  # one folder, no split: 10% is held out
    args = train.parse_args(["--data", str(data), "--init", str(small_model)])
    procs = train.Processes(torch.device("cpu"))
    d = train.read_data(args, procs)
    setup = train.build_model(args, procs, d)  # fills in what the flags left open: train.plan_run
    assert setup.small and setup.config.text.dropout == args.dropout == plan.DROPOUT
    assert (len(d.train.rows), len(d.val.rows), args.val_fraction) == (90, 10, 0.1)
    assert args.batch_size == plan.BATCH and args.max_steps == plan.small_set_steps(90, plan.BATCH)
    assert args.lr == pytest.approx(plan.LR_AT_128_32 * plan.BATCH / 32)
    assert args.eval_every == args.max_steps // 10 and args.patience == plan.PATIENCE and args.augment == "flip"
    flags = train.parse_args(["--data", str(data), "--init", str(small_model), "--batch-size", "4", "--epochs", "3",
                              "--dropout", "0"])
    train.plan_run(flags, train.read_data(flags, procs), setup.config.text.width)  # what the flags say, they keep
    assert (flags.batch_size, flags.epochs, flags.max_steps, flags.eval_every, flags.dropout) == (4, 3, None, None, 0)
    assert flags.lr == pytest.approx(plan.LR_AT_128_32 * 4 / 32)  # the rate follows the batch


def test_budget_and_rate_follow_the_data_and_the_width():
    steps = {n: plan.small_set_steps(n, min(plan.BATCH, n)) for n in (6, 16, 64, 256, 1000, 9000)}
    passes = {n: s * min(plan.BATCH, n) / n for n, s in steps.items()}
    assert passes[6] == passes[16] == plan.MAX_PASSES  # many passes over a handful
    assert passes[16] > passes[64] > passes[256] > passes[1000] == passes[9000] == plan.MIN_PASSES  # fewer as it grows
    assert steps[64] == steps[256] == plan.SAMPLES / plan.BATCH  # the same pictures seen in between
    assert plan.small_set_lr(256, 16) == pytest.approx(plan.small_set_lr(128, 16) / 2)  # 1 / width
    assert plan.small_set_lr(128, 32) == pytest.approx(plan.small_set_lr(128, 8) * 4)  # in proportion to the batch
    assert plan.small_set_lr(768, 8) == pytest.approx(4.17e-5, rel=1e-2)  # BLIP-base's
    dropout = {n: plan.small_set_dropout(passes[n], keep_last=False) for n in passes}
    assert dropout[16] == dropout[64] == plan.DROPOUT > 0  # many passes over few pictures: learned by heart without
    assert dropout[256] == dropout[1000] == 0  # 50 passes and fewer
    assert plan.small_set_dropout(passes[6], keep_last=True) == 0  # a handful, to be written as taught


def test_large_sets_and_scratch_keep_blips_epochs(small_model, tmp_path, monkeypatch):
    data = shapes_data(tmp_path / "large", 24, 4)
    monkeypatch.setattr(plan, "SMALL_SET", 10)  # 24 captions count as a large set here
    procs = train.Processes(torch.device("cpu"))
    for init, lr in ((str(small_model), plan.BLIP_LR * plan.BLIP_WIDTH / 128), ("scratch", 2e-3)):
        args = train.parse_args(["--data", str(data), "--init", init])
        d = train.read_data(args, procs)
        assert not train.build_model(args, procs, d).small
        assert (args.epochs, args.batch_size, args.max_steps, args.eval_every, args.patience) == (5, 32, None, None, 0)
        assert args.dropout == 0  # as HF's checkpoints
        assert args.lr == pytest.approx(lr)
