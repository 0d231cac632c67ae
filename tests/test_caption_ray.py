"""The Ray Data path (caption_ray.py, blip/tool/batch_captioner.py): the callable class gives caption.py's
captions of the same samples, and the script on a local Ray instance reads tar and parquet shards and
writes the same captions as parquet."""

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from blip.tool.batch_captioner import BatchCaptioner
from blip.tool.shards import read_output, samples
from tests.test_caption_dataset import ROOT, make_tree, run
from tests.test_caption_shards import parquet_shard, tar_shard, write_tar


@pytest.fixture
def shards(hf_taught, tmp_path, capsys):
    """Two tar shards and a parquet shard (a broken sample among them), and caption.py's outputs of them."""
    _, folder = hf_taught
    pictures = make_tree(tmp_path / "photos", 7)
    where = tmp_path / "shards"
    where.mkdir()
    tar_shard(where / "00000.tar", pictures[:3])
    write_tar(where / "00001.tar", [(p.name, p.read_bytes()) for p in pictures[3:5]] + [("bad.jpg", b"not a jpeg")])
    parquet_shard(where / "p.parquet", pictures[5:], hf=False)
    code, _, err = run(capsys, where / "00000.tar", where / "00001.tar", where / "p.parquet", "--checkpoint", folder,
                       "--output-dir", tmp_path / "expected")
    assert code == 1 and "00001.tar/bad" in err
    expected = {r["key"]: r.get("caption") for p in sorted((tmp_path / "expected").iterdir()) for r in read_output(p)}
    return folder, where, expected


def test_the_callable_class_gives_caption_py_captions(shards):
    folder, where, expected = shards
    rows = list(samples(where / "00001.tar"))
    keys, images = (np.array(column, dtype=object) for column in zip(*rows, strict=True))
    batch = {"__key__": keys, "jpg": images}  # as Ray Data's read_webdataset(decoder=None) gives it
    out = BatchCaptioner(str(folder), device="cpu")(batch).to_pydict()
    assert list(out["key"]) == [k for k, _ in rows]
    assert dict(zip(out["key"], out["caption"], strict=True)) == {k: expected[k] for k, _ in rows}
    assert out["caption"][-1] is None and "bad" in out["error"][-1] and out["error"][0] is None


def test_the_ray_script_on_a_local_ray_instance(shards, tmp_path):
    pytest.importorskip("ray")
    folder, where, expected = shards
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    done = subprocess.run([sys.executable, str(ROOT / "caption_ray.py"), str(where / "{00000..00001}.tar"),
                           str(where / "*.parquet"), "--checkpoint", str(folder), "--output-dir", str(tmp_path / "ray"),
                           "--actors", "1", "--batch-size", "2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pq.read_table(tmp_path / "ray").to_pylist()
    assert {r["key"]: r["caption"] for r in rows} == expected
    assert sum(r["error"] is not None for r in rows) == 1
