"""filter_data.py, BLIP's filter step: every pair scored, matched pairs kept as a new metadata.jsonl that
train.py reads, mismatched ones dropped and reported."""

import json

import torch
from test_retrieval import models

import filter_data
from blip.tool import shapes
from blip.tool.captioner import Matcher
from blip.tool.data import read_splits


def shapes_with_wrong_captions(root):
    """8 shape pictures, each with its own caption and, as a second row, the caption of another."""
    shapes.main([str(root), "--train", "6", "--val", "2", "--test", "0", "--side", "64"])
    truth = {}
    for split in ("train", "val"):
        path = root / split / "metadata.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        wrong = [{"file_name": r["file_name"], "text": records[(i + 1) % len(records)]["text"]}
                 for i, r in enumerate(records)]
        path.write_text("".join(json.dumps(r) + "\n" for r in records + wrong))
        truth.update({(root / split / r["file_name"]).resolve(): r["text"] for r in records})
    return truth


def test_keeps_matched_drops_mismatched(tokenizer, tmp_path, capsys, monkeypatch):
    truth = shapes_with_wrong_captions(tmp_path / "data")
    _, itm = models(tokenizer, "tiny")
    itm.save_pretrained(tmp_path / "itm", tokenizer)
    by_pixels = {}
    for path, text in truth.items():
        from PIL import Image

        by_pixels[Image.open(path).convert("RGB").tobytes()] = text

    def knows_the_answer(self, image, texts):  # a matching model that is always right
        return torch.tensor([0.9 if by_pixels[image.tobytes()] == t else 0.1 for t in texts])

    monkeypatch.setattr(Matcher, "scores", knows_the_answer)
    out = tmp_path / "filtered"
    assert filter_data.main(["--data", str(tmp_path / "data"), "--itm", str(tmp_path / "itm"), "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "kept 8 of 16 pairs" in report and "dropped 8" in report
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 16 and sum(s["kept"] for s in scores) == 8
    kept = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert sorted(((out / k["file_name"]).resolve(), k["text"]) for k in kept) == sorted(truth.items())
    train, val = read_splits(out, val_fraction=0.25)  # what train.py would read
    assert len(train.rows) + len(val.rows) == 8 and not train.problems


def test_real_head_scores_every_pair_and_bad_rows_stop(tokenizer, tmp_path, capsys):
    truth = shapes_with_wrong_captions(tmp_path / "data")
    _, itm = models(tokenizer, "tiny")
    itm.save_pretrained(tmp_path / "itm", tokenizer)
    out = tmp_path / "filtered"
    args = ["--data", str(tmp_path / "data"), "--itm", str(tmp_path / "itm"), "--out", str(out), "--device", "cpu"]
    assert filter_data.main(args) == 0
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 2 * len(truth)
    assert all(0 <= s["score"] <= 1 and s["kept"] == (s["score"] >= 0.5) for s in scores)
    matcher = Matcher.from_pretrained(tmp_path / "itm", device="cpu")
    first = scores[0]
    expected = matcher.scores(out / first["file_name"], [first["text"]])[0]
    assert abs(first["score"] - float(expected)) <= 1e-5
    capsys.readouterr()
    next(iter(truth)).unlink()  # a missing image: named, and nothing is scored without --skip-bad
    assert filter_data.main(args + ["--out", str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err and not (tmp_path / "again").exists()
    assert filter_data.main(args + ["--out", str(tmp_path / "again"), "--skip-bad"]) == 0


def test_parquet_images_are_written_once_each_and_out_is_checked(tokenizer, tmp_path, capsys):
    """Images stored as bytes get files named by their content (two parquet files both holding a
    "1.png" stay apart); --out inside --data, or over an earlier result, is refused."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest
    from PIL import Image

    data = tmp_path / "snapshot" / "data"
    data.mkdir(parents=True)
    for i, colour in enumerate(["red", "blue"]):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), colour).save(buf, format="PNG")
        images = [{"bytes": buf.getvalue(), "path": "1.png"}]
        pq.write_table(pa.table({"image": images, "text": [f"a {colour} square"]}), data / f"train-{i:05d}.parquet")
    _, itm = models(tokenizer, "tiny")
    itm.save_pretrained(tmp_path / "itm", tokenizer)
    out = tmp_path / "filtered"
    args = ["--data", str(tmp_path / "snapshot"), "--itm", str(tmp_path / "itm"), "--device", "cpu", "--threshold", "0"]
    assert filter_data.main(args + ["--out", str(out)]) == 0
    kept = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    colours = {Image.open(out / k["file_name"]).getpixel((0, 0)) for k in kept}
    assert len(kept) == 2 and colours == {(255, 0, 0), (0, 0, 255)}
    for bad in (out, tmp_path / "snapshot" / "inside"):  # an earlier result; inside the data
        with pytest.raises(SystemExit):
            filter_data.main(args + ["--out", str(bad)])
    capsys.readouterr()
