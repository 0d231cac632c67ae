"""train.py: the schedule, learning (16 pairs memorised exactly), bad data stops the run before
anything is written, resume after SIGKILL is bit-identical, 2-process DDP equals 1 process, and
what a run leaves behind (checkpoints caption.py takes, metrics, report)."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import caption
import train
from blip.tool import shapes
from blip.tool.captioner import Captioner

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--init", "scratch", "--preset", "tiny", "--log-every", "1", "--num-beams", "1"]


def shapes_data(folder: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    shapes.write_split(folder / "train", n_train, rng, side=64)
    shapes.write_split(folder / "val", n_val, rng, side=64)
    return folder


def run_train(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen, timeout: float = 300) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


def train_main(*args) -> int:
    return train.main([str(a) for a in args])


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_lr_schedule_values():
    peak, total = 1e-3, 100  # warm-up over the first 10 steps, then cosine to 0
    assert train.lr_at(0, total, peak, 0.1) == pytest.approx(1e-4)
    assert train.lr_at(4, total, peak, 0.1) == pytest.approx(5e-4)
    assert train.lr_at(9, total, peak, 0.1) == pytest.approx(1e-3)
    assert train.lr_at(10, total, peak, 0.1) == pytest.approx(1e-3)
    assert train.lr_at(55, total, peak, 0.1) == pytest.approx(5e-4)
    assert train.lr_at(99, total, peak, 0.1) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert train.lr_at(0, total, peak, 0.0) == peak  # no warm-up: cosine from the first step
    lrs = [train.lr_at(s, total, peak, 0.1) for s in range(total)]
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # never rises after the warm-up


def test_param_groups_decay_weights_only_and_scale_the_vit():
    from blip import BlipCaptioner
    from blip.config import tiny

    model = BlipCaptioner(tiny())
    groups = train.param_groups(model, 0.05, vision_lr_scale=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for g in groups:
        group = [names[id(p)] for p in g["params"]]
        vision = {n.startswith("visual_encoder.") for n in group}
        assert len(vision) == 1 and g["lr_scale"] == (0.1 if vision.pop() else 1.0)
        for name in group:
            plain = name.endswith(("bias", "pos_embed", "cls_token")) or "norm" in name or "embeddings" in name
            assert g["weight_decay"] == (0.0 if plain else 0.05), name
    decayed = {names[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    assert "visual_encoder.blocks.0.attn.qkv.weight" in decayed and "text_decoder.layers.0.mlp.fc1.weight" in decayed


def test_grad_checkpointing_flag_takes_a_mode():
    parse = train.parse_args
    assert parse(["--data", "d"]).grad_checkpointing == "auto"  # elementwise on CPU for big models
    assert parse(["--data", "d", "--grad-checkpointing"]).grad_checkpointing == "full"
    assert parse(["--data", "d", "--grad-checkpointing", "elementwise"]).grad_checkpointing == "elementwise"
    with pytest.raises(SystemExit):
        parse(["--data", "d", "--grad-checkpointing", "sometimes"])


def test_split_batch_keeps_order_and_sizes():
    assert train.split_batch(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert sum(train.split_batch(list(range(32)), 4), []) == list(range(32))


def test_overfits_16_pairs_to_their_exact_captions(tmp_path):
    """Trained from scratch on 16 pictures, the model captions each of them exactly."""
    data = tmp_path / "data"
    rng = random.Random(5)
    shapes.write_split(data / "train", 16, rng, side=64)
    (data / "val").mkdir()
    for f in (data / "train").iterdir():  # evaluate on the same pictures
        (data / "val" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "run"
    assert train_main("--data", data, "--out", out, *FAST, "--augment", "none", "--batch-size", 16,
                       "--epochs", 150, "--eval-every", 150, "--lr", 3e-3) == 0
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["type"] == "eval" and final["exact"] == 1.0 and final["cider"] == pytest.approx(10.0, abs=1e-6)
    captioner = Captioner.from_pretrained(out / "last", device="cpu")
    rows = [json.loads(line) for line in (data / "train" / "metadata.jsonl").read_text().splitlines()]
    got = captioner.caption([data / "train" / r["file_name"] for r in rows], "a picture of ", num_beams=3)
    assert got == [r["text"] for r in rows]


def test_bad_data_stops_before_anything_is_written(tmp_path, capsys):
    data = shapes_data(tmp_path / "data", 6, 2)
    meta = data / "train" / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    lines[1] = json.dumps({"file_name": "00001.png", "text": "  "})
    lines[3] = json.dumps({"file_name": "gone.png", "text": "a picture"})
    lines.append("{oops")
    meta.write_text("\n".join(lines) + "\n")
    (data / "train" / "00004.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    code = train_main("--data", data, "--out", out, *FAST, "--max-steps", 1)
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    for fragment in ("metadata.jsonl:2: empty caption", "metadata.jsonl:4: ", "gone.png: no such file",
                     "metadata.jsonl:5: ", "00004.png", "metadata.jsonl:7: not valid JSON", "4 bad row(s)"):
        assert fragment in err, fragment
    assert "Traceback" not in err

    assert train_main("--data", data, "--out", out, *FAST, "--max-steps", 1, "--skip-bad") == 0
    assert "dropped 4 bad row(s)" in capsys.readouterr().err
    assert (out / "last" / "model.safetensors").is_file()


def test_missing_init_and_existing_run_are_one_line_errors(tmp_path, capsys):
    data = shapes_data(tmp_path / "data", 4, 2)
    out = tmp_path / "run"
    assert train_main("--data", data, "--out", out, "--init", tmp_path / "nothing") == 1
    err = capsys.readouterr().err
    assert "convert_weights.py" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    assert train_main("--data", data, "--out", out, *FAST, "--max-steps", 1) == 0
    capsys.readouterr()
    assert train_main("--data", data, "--out", out, *FAST, "--max-steps", 1) == 1
    assert "--resume" in capsys.readouterr().err


def test_run_leaves_checkpoints_metrics_and_report(tmp_path, capsys):
    data = shapes_data(tmp_path / "data", 24, 4)
    out = tmp_path / "run"
    assert train_main("--data", data, "--out", out, *FAST, "--batch-size", 8, "--epochs", 2) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 7))
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]  # before training, then every epoch
    assert all({"val_loss", "bleu4", "cider", "exact", "gallery"} <= set(r) for r in evals)
    page = (out / "report.html").read_text()
    assert page.count("<svg") == 4 and page.count("data:image/jpeg;base64,") == 3 * 4
    for name in ("best", "last"):  # caption.py takes both folders as they are
        assert caption.main([str(data / "val" / "00000.png"), "--checkpoint", str(out / name)]) == 0
    assert "00000.png: " in capsys.readouterr().out
    saved = json.loads((out / "last" / "training.json").read_text())
    assert saved["step"] == 6 and saved["args"]["batch_size"] == 8


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """Killed mid-run and resumed, the final weights equal an uninterrupted run's, bit for bit:
    data order, augmentation, dropout stream, optimizer moments and schedule all continue."""
    data = shapes_data(tmp_path / "data", 40, 4)
    common = ["--data", data, *FAST, "--batch-size", 8, "--max-steps", 30, "--save-every", 3, "--eval-every", 10,
              "--dropout", 0.1]
    whole = run_train(*common, "--out", tmp_path / "whole")
    killed = run_train(*common, "--out", tmp_path / "killed")
    state = tmp_path / "killed" / "last" / "training.json"
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 6:
            break
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    step = json.loads(state.read_text())["step"]
    assert 6 <= step < 30, "the run was not killed midway"
    finished(run_train("--out", tmp_path / "killed", "--resume"))
    finished(whole)
    a, b = weights(tmp_path / "whole" / "last"), weights(tmp_path / "killed" / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (load_file(str(tmp_path / r / "last" / "training.safetensors")) for r in ("whole", "killed"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert steps == list(range(1, 31))  # no step logged twice, none missing


def test_two_process_ddp_equals_one_process(tmp_path):
    """torchrun with 2 gloo processes, each taking half of every batch, ends with the weights of
    one process taking the whole batch (up to float summation order)."""
    data = shapes_data(tmp_path / "data", 32, 4)
    common = ["--data", data, *FAST, "--batch-size", 8, "--grad-accum", 2, "--max-steps", 4]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = run_train(*common, "--out", tmp_path / "one", env=env)
    finished(one)
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(ROOT / "train.py"), *map(str, common), "--out", str(tmp_path / "two")],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finished(two)
    a, b = weights(tmp_path / "one" / "last"), weights(tmp_path / "two" / "last")
    start = weights(tmp_path / "one" / "last")  # sanity: training moved the weights well beyond the tolerance
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
    assert start.keys() == a.keys()
    losses = [[json.loads(line)["loss"] for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
               if '"train"' in line] for r in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
