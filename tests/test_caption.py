"""caption.py and the Captioner API: end-to-end equal to HF's processor + generate + decode;
files, folders and globs; text/jsonl/csv; bad files named, the rest still captioned."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import skimage
import torch
from PIL import Image
from transformers import BertTokenizerFast, BlipImageProcessor, BlipProcessor

import caption
from blip.tool.captioner import Captioner

# every test here on both linear paths (blip/speed/linear.py), whatever the CPU
pytestmark = pytest.mark.usefixtures("linear_path")

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of five photographs (one in a subfolder) and a file that is not an image."""
    d = tmp_path_factory.mktemp("images")
    (d / "sub").mkdir()
    for name, out in [("astronaut.png", "a.png"), ("coffee.png", "b.png"), ("chelsea.png", "c.jpg"),
                      ("rocket.jpg", "sub/d.jpg"), ("motorcycle_left.png", "e.webp")]:
        Image.open(PHOTOS / name).convert("RGB").save(d / out)
    (d / "notes.txt").write_text("not an image")
    return d


def test_api_equals_hf_end_to_end(hf_taught, vocab_dir, images):
    """Pixels, decoding, detokenising and prompt stripping together, against HF's pipeline with
    the prompt cut off the decoded text as the original BLIP does."""
    hf, folder = hf_taught
    captioner = Captioner.from_pretrained(folder, device="cpu")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 64, "width": 64}),
                              BertTokenizerFast(vocab=str(vocab_dir / "vocab.txt")))
    pil = [Image.open(p).convert("RGB") for p in sorted(images.glob("*.png"))]
    for prompt in ("", "a picture of "):
        # every setting spelled out: the checkpoint's own defaults (beam 3, 20/5) are not HF generate's
        for options in (dict(num_beams=1, max_new_tokens=20, min_new_tokens=0),
                        dict(num_beams=3, max_new_tokens=20, min_new_tokens=5)):
            inputs = processor(images=pil, text=[prompt] * len(pil) if prompt else None, return_tensors="pt")
            with torch.no_grad():
                out = hf.generate(**inputs, **options)
            expected = [t[len(prompt):].strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
            assert captioner.caption(pil, prompt, **options) == expected


def test_bans_equal_hf(hf_taught, vocab_dir, images, capsys):
    """--no-repeat-ngram and --bad-words give HF generate's captions with no_repeat_ngram_size and
    bad_words_ids (the words' tokens), at the checkpoint's defaults: beam 3, 5-20 tokens, BLIP's prompt."""
    hf, folder = hf_taught
    processor = BlipProcessor(BlipImageProcessor(size={"height": 64, "width": 64}),
                              BertTokenizerFast(vocab=str(vocab_dir / "vocab.txt")))
    paths = sorted(images.glob("*.png"))
    pil = [Image.open(p).convert("RGB") for p in paths]
    prompt, bad = "a picture of ", ["a", "with", "on the"]
    inputs = processor(images=pil, text=[prompt] * len(pil), return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, num_beams=3, max_new_tokens=20, min_new_tokens=5, no_repeat_ngram_size=2,
                          bad_words_ids=processor.tokenizer(bad, add_special_tokens=False).input_ids)
    expected = [t[len(prompt):].strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
    code, out, err = run(capsys, *paths, "--checkpoint", folder, "--no-repeat-ngram", 2, "--bad-words", ",".join(bad))
    assert code == 0, err
    assert [line.split(": ", 1)[1] for line in out.splitlines()] == expected
    code, plain, _ = run(capsys, *paths, "--checkpoint", folder)
    assert plain != out  # the bans changed some caption


def run(capsys, *args) -> tuple[int, str, str]:
    code = caption.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_files_folders_globs_and_formats(hf_taught, images, tmp_path, capsys):
    _, folder = hf_taught
    common = ["--checkpoint", folder, "--beams", 2, "--max-length", 8, "--min-length", 2]
    code, out, err = run(capsys, images / "a.png", images / "sub", str(images / "[bc].*"), *common)
    assert code == 0, err
    lines = out.splitlines()
    names = ("a.png", "sub/d.jpg", "b.png", "c.jpg")
    assert [line.split(": ")[0] for line in lines] == [str(images / n) for n in names]
    captions = [line.split(": ", 1)[1] for line in lines]
    assert all(captions)

    code, _, err = run(capsys, images, *common, "--format", "jsonl", "--output", tmp_path / "c.jsonl",
                       "--batch-size", 2)
    assert code == 0 and "notes.txt" not in err  # a folder gives only its images
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["a.png", "b.png", "c.jpg", "e.webp", "d.jpg"]
    by_name = {Path(r["image"]).name: r["caption"] for r in rows}
    assert [by_name[n] for n in ("a.png", "d.jpg", "b.png", "c.jpg")] == captions  # batching changes nothing

    code, _, err = run(capsys, images / "a.png", images / "b.png", *common, "--format", "csv",
                       "--output", tmp_path / "c.csv")
    assert code == 0, err
    table = list(csv.reader((tmp_path / "c.csv").open()))
    assert table[0] == ["image", "caption"] and [r[1] for r in table[1:]] == [captions[0], captions[2]]


def test_bad_inputs_are_named_and_the_rest_captioned(hf_taught, images, tmp_path, capsys):
    _, folder = hf_taught
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    code, out, err = run(capsys, images / "a.png", tmp_path / "broken.jpg", images / "notes.txt",
                         tmp_path / "missing.png", str(tmp_path / "*.gif"), images / "b.png",
                         "--checkpoint", folder, "--max-length", 6)
    assert code == 1
    assert [line.split(": ")[0] for line in out.splitlines()] == [str(images / "a.png"), str(images / "b.png")]
    for name in ("broken.jpg", "notes.txt", "missing.png", "*.gif"):
        assert name in err
    assert "Traceback" not in err and "4 of 6 inputs could not be captioned" in err


def test_missing_checkpoint_says_how_to_make_one(images, tmp_path, capsys):
    code, out, err = run(capsys, images / "a.png", "--checkpoint", tmp_path / "nope")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "convert_weights.py" in err


def test_sampling_with_a_seed_repeats(hf_taught, images, capsys):
    _, folder = hf_taught
    args = [images / "a.png", images / "b.png", "--checkpoint", folder, "--sample", "--max-length", 10]
    first = run(capsys, *args, "--seed", 1)
    second = run(capsys, *args, "--seed", 1)
    assert first[0] == second[0] == 0 and first[1] == second[1]  # same captions


def test_api_sampling_draws_one_sequence(hf_taught, images):
    """Captioner.caption(sample=True) on a checkpoint whose defaults are beam search: one sampled
    sequence, as caption.py --sample, the same as asking for one beam; more beams with sampling is an error."""
    _, folder = hf_taught
    captioner = Captioner.from_pretrained(folder, device="cpu")
    assert captioner.defaults.num_beams == 3
    pil = [Image.open(images / "a.png").convert("RGB")]
    drawn = captioner.caption(pil, sample=True, top_p=0.9, seed=0)
    assert drawn == captioner.caption(pil, sample=True, top_p=0.9, seed=0, num_beams=1)
    with pytest.raises(ValueError, match="sampling uses one beam"):
        captioner.caption(pil, sample=True, seed=0, num_beams=3)


def test_sampling_has_one_default_from_the_cli_and_the_api(hf_taught, images, capsys):
    """caption.py --sample and Captioner.caption(sample=True) draw the same captions: both BLIP's top-p 0.9
    and repetition penalty 1.1, unless told otherwise."""
    from blip.decoding import SAMPLING, changed

    _, folder = hf_taught
    captioner = Captioner.from_pretrained(folder, device="cpu")
    sampled = changed(captioner.defaults, sample=True)
    assert (sampled.top_p, sampled.repetition_penalty, sampled.num_beams) == (0.9, 1.1, 1) == (*SAMPLING.values(), 1)
    paths = [images / "a.png", images / "b.png"]
    code, out, _ = run(capsys, *paths, "--checkpoint", folder, "--sample", "--seed", 3)
    assert code == 0
    assert [line.split(": ", 1)[1] for line in out.splitlines()] == captioner.caption(paths, sample=True, seed=3)
    assert changed(captioner.defaults, sample=True, top_p=0.5).top_p == 0.5


def test_bad_options_are_usage_errors(images, capsys):
    for bad in (["--beams", "0"], ["--min-length", "9", "--max-length", "4"], ["--top-p", "2"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit) as e:
            caption.main([str(images / "a.png"), *bad])
        assert e.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_cli_process(hf_taught, images):
    """As users run it: --help, then a real run with one unreadable file: no traceback, exit 1."""
    _, folder = hf_taught
    cmd = [sys.executable, str(ROOT / "caption.py")]
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--repetition-penalty" in out.stdout
    out = subprocess.run(cmd + [str(images / "a.png"), str(images / "notes.txt"), "--checkpoint", str(folder)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stdout.startswith(str(images / "a.png") + ": ")
