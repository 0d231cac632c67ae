"""caption.py on whole data sets: caption files beside the pictures and what happens to existing ones,
broken pictures named and never captioned, reruns that skip finished work, a SIGKILLed run resumed with
every picture captioned once, captions that do not depend on the batch size, torchrun's processes
writing what one process writes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import skimage
from PIL import Image

import caption

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = Path(skimage.__file__).parent / "data"
SOURCES = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "camera.png"]


def make_tree(folder: Path, n: int = 12) -> list[Path]:
    """n photographs (JPEG, PNG, WebP; some in a sub-folder) of several sizes, in `folder`."""
    paths = []
    for i in range(n):
        im = Image.open(PHOTOS / SOURCES[i % len(SOURCES)]).convert("RGB")
        im = im.resize((64 + 16 * (i % 4), 48 + 16 * (i % 3)))
        path = folder / ("sub" if i % 3 == 0 else "") / f"p{i:02d}.{['jpg', 'png', 'webp'][i % 3]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
        paths.append(path)
    return paths


def run(capsys, *args) -> tuple[int, str, str]:
    code = caption.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sidecars_existing_modes_broken_files_and_reruns(hf_taught, tmp_path, capsys):
    _, folder = hf_taught
    tree = tmp_path / "tree"
    paths = make_tree(tree, 6)
    (tree / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    paths[1].with_suffix(".txt").write_text("an old caption\n")  # a picture captioned before
    common = ["--checkpoint", folder, "--batch-size", 4, "--workers", 1]

    code, _, err = run(capsys, tree, "--sidecar", *common)  # default: skip pictures that have a caption file
    assert code == 1 and "broken.jpg" in err and "Traceback" not in err
    assert not (tree / "broken.txt").exists()
    assert paths[1].with_suffix(".txt").read_text() == "an old caption\n"
    new = {p: p.with_suffix(".txt").read_text() for p in paths if p != paths[1]}
    assert all(text.strip() and text.endswith("\n") and text.count("\n") == 1 for text in new.values())
    assert "1 of 7 pictures have their caption already" in err

    stamps = {p: p.with_suffix(".txt").stat().st_mtime_ns for p in paths}
    code, _, err = run(capsys, tree, "--sidecar", *common)  # a rerun: only the broken picture is left
    assert code == 1 and "6 of 7 pictures have their caption already" in err
    assert stamps == {p: p.with_suffix(".txt").stat().st_mtime_ns for p in paths}  # nothing written again

    caption_of = {p: t.strip() for p, t in new.items()}
    target = paths[2]
    for mode, expected in [("append", f"{caption_of[target]}\n{caption_of[target]}"),
                           ("prepend", f"x {caption_of[target]}\n{caption_of[target]}\n{caption_of[target]}"),
                           ("overwrite", f"{caption_of[target]} y")]:
        extra = {"prepend": ["--prefix", "x "], "overwrite": ["--suffix", " y"]}.get(mode, [])
        assert run(capsys, target, "--sidecar", "--existing", mode, *common, *extra)[0] == 0
        assert target.with_suffix(".txt").read_text() == expected + "\n", mode

    out = tmp_path / "captions"  # --output-dir mirrors the tree, another extension
    assert run(capsys, tree, "--sidecar", ".caption", "--output-dir", out, *common)[0] == 1  # broken.jpg
    assert (out / "sub" / "p00.caption").read_text().strip() == caption_of[paths[0]]
    assert (out / "p02.caption").read_text().strip() == caption_of[paths[2]]


def test_sidecars_that_would_collide_are_each_named_and_the_rest_captioned(hf_taught, tmp_path, capsys):
    _, folder = hf_taught
    paths = make_tree(tmp_path, 3)  # sub/p00.jpg, p01.png, p02.webp
    shutil.copy(paths[0], tmp_path / "sub" / "p00.png")  # one file in any file system
    shutil.copy(paths[1], tmp_path / "P01.jpg")  # one file where names ignore case (macOS, Windows)
    code, _, err = run(capsys, tmp_path, "--sidecar", "--checkpoint", folder)
    assert code == 1 and "Traceback" not in err
    assert f"{tmp_path / 'sub' / 'p00.jpg'} and {tmp_path / 'sub' / 'p00.png'} would write one caption file" in err
    assert f"{tmp_path / 'P01.jpg'} and {paths[1]} would write one caption file" in err
    assert "4 of 5 inputs could not be captioned" in err
    assert sorted(tmp_path.rglob("*.txt")) == [paths[2].with_suffix(".txt")]


def test_output_file_resume_failures_and_refusal(hf_taught, tmp_path, capsys):
    _, folder = hf_taught
    tree = tmp_path / "tree"
    paths = make_tree(tree, 5)
    (tree / "broken.png").write_bytes(b"nothing")
    out = tmp_path / "c.jsonl"
    code, _, err = run(capsys, tree, "--checkpoint", folder, "--format", "jsonl", "--output", out)
    records = jsonl(out)
    assert code == 1 and "broken.png" in err
    assert [r for r in records if "error" in r][0]["image"] == str(tree / "broken.png")
    assert sorted(r["image"] for r in records if "caption" in r) == sorted(map(str, paths))

    with pytest.raises(SystemExit) as e:  # never overwritten by a run without --resume
        caption.main([str(tree), "--checkpoint", str(folder), "--format", "jsonl", "--output", str(out)])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    assert jsonl(out) == records

    with open(out, "a") as f:  # a kill in the middle of a line, and a picture the file does not hold
        f.write('{"image": "half')
    extra = tmp_path / "more.png"
    shutil.copy(paths[0], extra)
    code, _, err = run(capsys, tree, extra, "--checkpoint", folder, "--format", "jsonl", "--output", out, "--resume")
    after = jsonl(out)
    assert code == 1  # the broken picture is tried again, and fails again
    assert after[: len(records)] == records
    assert [r["image"] for r in after[len(records):] if "caption" in r] == [str(extra)]


def killed_then_resumed(folder, tmp_path: Path, *args, count) -> None:
    """Start caption.py, SIGKILL it once `count()` says a few pictures are done, run it again."""
    cmd = [sys.executable, str(ROOT / "caption.py"), *map(str, args), "--checkpoint", str(folder), "--batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and count() < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert 3 <= count() < 24, "the run was not killed midway"
    resumed = subprocess.run(cmd + (["--resume"] if "--output" in map(str, args) else []), cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_sigkill_then_resume_captions_every_picture_once(hf_taught, tmp_path):
    _, folder = hf_taught
    tree = tmp_path / "tree"
    paths = make_tree(tree, 24)
    out = tmp_path / "c.jsonl"

    def lines():
        return out.read_text().count("\n") if out.is_file() else 0

    killed_then_resumed(folder, tmp_path, tree, "--format", "jsonl", "--output", out, count=lines)
    images = [r["image"] for r in jsonl(out)]
    assert sorted(images) == sorted(map(str, paths))  # each exactly once

    def sidecars():
        return len(list(tree.rglob("*.txt")))

    killed_then_resumed(folder, tmp_path, tree, "--sidecar", count=sidecars)
    texts = [p.with_suffix(".txt").read_text() for p in paths]
    assert all(t.strip() and t.count("\n") == 1 for t in texts)  # each picture one caption, none empty
    by_image = {r["image"]: r["caption"] for r in jsonl(out)}
    assert [t.strip() for t in texts] == [by_image[str(p)] for p in paths]  # the same captions either way


def test_captions_do_not_depend_on_the_batch_size(hf_taught, tmp_path, capsys):
    """fp32 on the CPU: the same captions one picture at a time as in batches of 5, with and without workers."""
    _, folder = hf_taught
    paths = make_tree(tmp_path, 10)
    outputs = []
    for batch, workers in ((1, 0), (5, 1), (10, 0)):
        code, out, err = run(capsys, *paths, "--checkpoint", folder, "--batch-size", batch, "--workers", workers)
        assert code == 0, err
        outputs.append(out)
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(set(line.split(": ", 1)[1] for line in outputs[0].splitlines())) > 1  # captions differ by picture


def test_two_torchrun_processes_write_what_one_does(hf_taught, tmp_path):
    _, folder = hf_taught
    tree = tmp_path / "tree"
    make_tree(tree, 9)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [str(tree), "--checkpoint", str(folder), "--format", "jsonl"]
    one = subprocess.run([sys.executable, str(ROOT / "caption.py"), *common, "--output", str(tmp_path / "one.jsonl")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "caption.py")]
    two = subprocess.run([*torchrun, *common, "--output", str(tmp_path / "two.jsonl")], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert not list(tmp_path.glob("two.jsonl.part-*"))
    sidecar = subprocess.run([*torchrun, str(tree), "--checkpoint", str(folder), "--sidecar"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert sidecar.returncode == 0, sidecar.stderr[-2000:]
    by_image = {r["image"]: r["caption"] for r in jsonl(tmp_path / "one.jsonl")}
    assert {str(p.with_suffix(p.suffix)): p.with_suffix(".txt").read_text().strip() for p in
            sorted(tree.rglob("*")) if p.suffix != ".txt" and p.is_file()} == by_image
