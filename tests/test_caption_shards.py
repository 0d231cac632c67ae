"""caption.py on shards: webdataset tar files and parquet files of image bytes (brace patterns too) give the
captions of the same pictures as files, an output per shard keyed by the sample's key, written whole; a
rerun skips finished shards; bad samples are named and the rest captioned; a job killed mid-shard and run
again captions every sample once; two torchrun processes split the shards and write what one writes."""

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import caption
from blip.tool.shards import ShardError, expand_braces, read_output, samples, shard_arguments
from tests.test_caption_dataset import ROOT, make_tree, run


def write_tar(path: Path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def tar_shard(path: Path, pictures: list[Path]):
    """A webdataset shard as img2dataset writes one: key.<image suffix>, key.txt, key.json per sample."""
    members = []
    for p in pictures:
        members += [(f"{p.stem}{p.suffix}", p.read_bytes()), (f"{p.stem}.txt", b"an original caption"),
                    (f"{p.stem}.json", b'{"url": "x"}')]
    write_tar(path, members)


def parquet_shard(path: Path, pictures: list[Path], hf: bool):
    """HF datasets' layout (image: {bytes, path}) or img2dataset's (key + jpg bytes)."""
    if hf:
        rows = {"image": [{"bytes": p.read_bytes(), "path": p.name} for p in pictures], "text": ["x"] * len(pictures)}
    else:
        rows = {"key": [p.stem for p in pictures], "jpg": [p.read_bytes() for p in pictures]}
    pq.write_table(pa.table(rows), path, row_group_size=2)


def captions_of_files(capsys, folder, pictures: list[Path]) -> dict[str, str]:
    code, out, err = run(capsys, *pictures, "--checkpoint", folder)
    assert code == 0, err
    return {Path(line.split(": ", 1)[0]).stem: line.split(": ", 1)[1] for line in out.splitlines()}


def test_brace_patterns_and_what_counts_as_a_shard():
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}.parquet") == ["a-1.parquet", "a-2.parquet", "b-1.parquet", "b-2.parquet"]
    assert expand_braces("photo{x}.jpg") == ["photo{x}.jpg"]
    assert shard_arguments(["a.TAR", "s/{0..3}.tar", "x.jpg", "d/", "*.parquet"]) == \
        (["a.TAR", "s/{0..3}.tar", "*.parquet"], ["x.jpg", "d/"])


def test_tar_and_parquet_shards_give_the_files_captions_by_key(hf_taught, tmp_path, capsys):
    _, folder = hf_taught
    pictures = make_tree(tmp_path / "photos", 9)
    expected = captions_of_files(capsys, folder, pictures)
    shards = tmp_path / "shards"
    shards.mkdir()
    tar_shard(shards / "00000.tar", pictures[:3])
    tar_shard(shards / "00001.tar", pictures[3:5])
    parquet_shard(shards / "hf.parquet", pictures[5:7], hf=True)
    parquet_shard(shards / "img2dataset.parquet", pictures[7:], hf=False)

    out = tmp_path / "out"
    code, _, err = run(capsys, str(shards / "{00000..00001}.tar"), str(shards / "*.parquet"), "--checkpoint", folder,
                       "--output-dir", out, "--batch-size", 2)
    assert code == 0, err
    outputs = {p.name: read_output(p) for p in sorted(out.iterdir())}
    assert list(outputs) == ["00000.parquet", "00001.parquet", "hf.parquet", "img2dataset.parquet"]
    assert [r["key"] for r in outputs["00000.parquet"]] == [p.stem for p in pictures[:3]]  # the shard's order
    assert [r["key"] for r in outputs["hf.parquet"]] == [p.name for p in pictures[5:7]]  # HF's image path
    got = {Path(r["key"]).stem: r["caption"] for records in outputs.values() for r in records}
    assert got == expected
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left

    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = run(capsys, str(shards / "*.tar"), str(shards / "*.parquet"), "--checkpoint", folder,
                       "--output-dir", out)
    assert code == 0 and "4 of 4 shards have their output" in err and "nothing left to caption" in err
    assert stamps == {p: p.stat().st_mtime_ns for p in out.iterdir()}

    code, _, err = run(capsys, shards / "00001.tar", "--checkpoint", folder, "--output-dir", tmp_path / "j",
                       "--format", "jsonl")
    assert code == 0, err
    assert read_output(tmp_path / "j" / "00001.jsonl") == outputs["00001.parquet"]


def test_bad_samples_are_named_and_the_rest_captioned(hf_taught, tmp_path, capsys):
    _, folder = hf_taught
    pictures = make_tree(tmp_path / "photos", 3)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "a.tar", [("good.jpg", pictures[0].read_bytes()), ("bad.jpg", b"\xff\xd8\xff not a jpeg"),
                                 ("textonly.txt", b"a caption without a picture"),
                                 ("sub/good2.png", pictures[1].read_bytes())])
    pq.write_table(pa.table({"key": ["k0", "k1"], "jpg": [None, pictures[2].read_bytes()]}), shards / "b.parquet")
    tar_shard(tmp_path / "whole.tar", pictures)
    (shards / "cut.tar").write_bytes((tmp_path / "whole.tar").read_bytes()[:5000])  # cut short by a failed copy
    (shards / "junk.parquet").write_bytes(b"not parquet")

    out = tmp_path / "out"
    code, _, err = run(capsys, shards / "a.tar", shards / "b.parquet", shards / "cut.tar", shards / "junk.parquet",
                       "--checkpoint", folder, "--output-dir", out)
    assert code == 1 and "Traceback" not in err
    a = {r["key"]: r for r in read_output(out / "a.parquet")}
    assert list(a) == ["good", "bad", "textonly", "sub/good2"]
    assert a["good"]["caption"] and a["sub/good2"]["caption"] and "error" not in a["good"]
    assert "bad" in a["bad"]["error"] and "no image" in a["textonly"]["error"]
    assert "caption" not in a["bad"]
    b = {r["key"]: r for r in read_output(out / "b.parquet")}
    assert "no image" in b["k0"]["error"] and b["k1"]["caption"]
    for name in ("a.tar/bad", "a.tar/textonly", "b.parquet/k0", "cut.tar", "junk.parquet"):
        assert name in err, name
    assert not (out / "cut.parquet").exists() and not (out / "junk.parquet").exists()  # tried again by a rerun
    assert "5 samples or shards could not be captioned" in err
    with pytest.raises(ShardError):
        list(samples(shards / "cut.tar"))

    code, _, err = run(capsys, shards / "a.tar", shards / "b.parquet", shards / "cut.tar", "--checkpoint", folder,
                       "--output-dir", out)
    assert code == 1 and "2 of 3 shards have their output" in err and "cut.tar" in err


def test_shard_arguments_refused_in_one_line(hf_taught, tmp_path, capsys):
    _, folder = hf_taught
    pictures = make_tree(tmp_path / "photos", 2)
    tar_shard(tmp_path / "s.tar", pictures)
    parquet_shard(tmp_path / "p.parquet", pictures, hf=False)
    for extra, message in [([], "add --output-dir DIR"),
                           ([pictures[0], "--output-dir", tmp_path], "not both"),
                           (["--output-dir", tmp_path, "--sidecar"], "--sidecar is for pictures"),
                           (["--output-dir", tmp_path, "--format", "csv"], "parquet or jsonl")]:
        with pytest.raises(SystemExit):
            caption.parse_args([str(tmp_path / "s.tar"), *map(str, extra), "--checkpoint", str(folder)])
        assert message in capsys.readouterr().err
    code, _, err = run(capsys, tmp_path / "p.parquet", "--checkpoint", folder, "--output-dir", tmp_path)
    assert code == 1 and "its output over itself" in err and pq.read_table(tmp_path / "p.parquet").num_rows == 2


def test_a_job_killed_mid_shard_then_rerun_captions_every_sample_once(hf_taught, tmp_path):
    _, folder = hf_taught
    pictures = make_tree(tmp_path / "photos", 12)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(4):  # 4 shards of 12 samples, keys unique across shards
        write_tar(shards / f"{i:05d}.tar", [(f"s{i}-{p.stem}{p.suffix}", p.read_bytes()) for p in pictures])
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "caption.py"), str(shards / "{00000..00003}.tar"), "--checkpoint",
               str(folder), "--output-dir", str(out), "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.parquet")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = sorted(out.glob("*.parquet"))
    assert 1 <= len(done) < 4  # killed with a shard whole and another in flight
    for p in done:
        assert len(read_output(p)) == 12  # an output is whole or absent
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(done)} of 4 shards have their output" in again.stderr
    keys = [r["key"] for p in sorted(out.glob("*.parquet")) for r in read_output(p)]
    assert sorted(keys) == sorted(f"s{i}-{p.stem}" for i in range(4) for p in pictures)  # each once
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.parquet" for i in range(4)]  # nothing else


def test_two_torchrun_processes_split_the_shards_and_write_what_one_does(hf_taught, tmp_path):
    _, folder = hf_taught
    pictures = make_tree(tmp_path / "photos", 6)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        tar_shard(shards / f"{i:05d}.tar", pictures[2 * i : 2 * i + 2])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [str(shards / "*.tar"), "--checkpoint", str(folder), "--format", "jsonl"]
    one = subprocess.run([sys.executable, str(ROOT / "caption.py"), *common, "--output-dir", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "caption.py")]
    two = subprocess.run([*torchrun, *common, "--output-dir", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["00000.jsonl", "00001.jsonl", "00002.jsonl"]
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
