"""train.py as users fine-tune: caption lengths taken from the data, cached image tokens, LoRA folders
(caption.py takes them, --resume continues them, a merge exports them), --patience, --eval-data and a
report whose training and validation losses are the same measure."""

import json
import random
import signal
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import FAST, finished, run_train, shapes_data, train_main

import caption
import convert_weights
import train
from blip import BlipCaptioner
from blip.checkpoint import CheckpointError, load_tokenizer, read_config
from blip.lora import adapters
from blip.tool import shapes
from blip.tool.captioner import Captioner

# 20 words after the shapes caption's 6-8: captions of 26-28 words, longer than BLIP's 20 tokens
TAIL = ("and nothing else is drawn on the light grey ground of this picture except for a few faint specks of dust")


def long_caption_data(folder: Path, n: int) -> Path:
    """n pictures, each captioned by its shapes caption and TAIL; the same pictures are the held-out set."""
    rng = random.Random(3)
    (folder / "train").mkdir(parents=True)
    (folder / "val").mkdir()
    rows = []
    for i in range(n):
        im, text = shapes.draw(rng, side=64)
        im.save(folder / "train" / f"{i}.png")
        im.save(folder / "val" / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"{text} {TAIL}"}) + "\n")
    for split in ("train", "val"):
        (folder / split / "metadata.jsonl").write_text("".join(rows))
    return folder


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_generation_defaults_fit_the_captions():
    def args(**flags):
        return Namespace(**{"num_beams": 3, "max_new_tokens": None, "min_new_tokens": None, **flags})

    assert train.fit_generation(6, 9, 60, args()) == train.GenerationConfig(3, 20, 5)  # BLIP's 20 / 5
    assert train.fit_generation(25, 33, 60, args()).max_new_tokens == 33 + 8 + 1  # the longest plus a quarter
    assert train.fit_generation(25, 33, 36, args()).max_new_tokens == 36  # no more than the positions left
    assert train.fit_generation(3, 9, 60, args()).min_new_tokens == 3  # never longer than the shortest caption
    flags = args(num_beams=1, max_new_tokens=12, min_new_tokens=2)
    assert train.fit_generation(6, 30, 60, flags) == train.GenerationConfig(1, 12, 2)


def test_captions_longer_than_20_tokens_come_out_whole(tmp_path, capsys):
    """Trained on captions of 26-28 words, evaluation, caption.py and Captioner give them whole: the
    checkpoint says how long its captions may be."""
    data = long_caption_data(tmp_path / "data", 8)
    out = tmp_path / "run"
    assert train_main("--data", data, "--out", out, *FAST, "--augment", "none", "--batch-size", 8,
                      "--epochs", 120, "--eval-every", 120, "--lr", 3e-3) == 0
    truth = [json.loads(line)["text"] for line in (data / "val" / "metadata.jsonl").read_text().splitlines()]
    assert min(len(t.split()) for t in truth) >= 26
    assert records(out, "eval")[-1]["exact"] == 1.0  # evaluation: every caption whole and right
    generation = read_config(out / "best").generation
    assert generation.max_new_tokens >= 30 and generation.num_beams == 1

    capsys.readouterr()
    paths = [data / "val" / f"{i}.png" for i in range(len(truth))]
    assert caption.main([*map(str, paths), "--checkpoint", str(out / "best")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == truth
    assert Captioner.from_pretrained(out / "best", device="cpu").caption(paths) == truth


# --- cached image tokens ---------------------------------------------------------------------------
def test_cached_image_tokens_give_the_uncached_losses(tmp_path):
    """With the ViT frozen, tokens computed once per view (flips included) train the decoder to the same
    losses and weights as running the ViT every step."""
    data = shapes_data(tmp_path / "data", 24, 4)
    common = ["--data", data, *FAST, "--freeze-vision", "--augment", "flip", "--batch-size", 8, "--max-steps", 6,
              "--eval-every", 6]
    assert train_main(*common, "--out", tmp_path / "plain") == 0
    assert train_main(*common, "--out", tmp_path / "cached", "--cache-image-tokens") == 0
    tokens = tmp_path / "cached" / "image_tokens" / "tokens.npy"
    assert tokens.is_file() and not (tmp_path / "plain" / "image_tokens").exists()
    a, b = (records(tmp_path / r, "train") for r in ("plain", "cached"))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=2e-5)
    assert a[0]["loss"] != pytest.approx(a[-1]["loss"], abs=1e-2)  # training moved: the comparison means something
    wa, wb = (load_file(str(tmp_path / r / "last" / "model.safetensors")) for r in ("plain", "cached"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_cache_needs_a_frozen_vit_and_fixed_views(tmp_path, capsys):
    data = shapes_data(tmp_path / "data", 4, 2)
    for bad in (["--cache-image-tokens", "--augment", "flip"],
                ["--cache-image-tokens", "--freeze-vision", "--augment", "blip"]):
        with pytest.raises(SystemExit) as e:
            train.parse_args(["--data", str(data), *bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--cache-image-tokens" in err and "Traceback" not in err


def killed_and_resumed_equals_whole(tmp_path: Path, *flags) -> tuple[Path, Path]:
    """A run killed by SIGKILL midway and resumed ends with the weights of an uninterrupted one, bit for
    bit. Returns the two run folders (whole, killed)."""
    common = [*flags, "--batch-size", 8, "--max-steps", 24, "--save-every", 3, "--eval-every", 12]
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
    assert 6 <= step < 24, "the run was not killed midway"
    finished(run_train("--out", tmp_path / "killed", "--resume"))
    finished(whole)
    return tmp_path / "whole", tmp_path / "killed"


def test_cached_run_resumes_bit_identical_and_reuses_its_tokens(tmp_path):
    data = shapes_data(tmp_path / "data", 40, 4)
    whole, killed = killed_and_resumed_equals_whole(tmp_path, "--data", data, *FAST, "--freeze-vision",
                                                    "--cache-image-tokens", "--augment", "flip")
    a, b = (load_file(str(r / "last" / "model.safetensors")) for r in (whole, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = killed / "image_tokens" / "key.json"
    assert key.stat().st_mtime < (killed / "last" / "training.json").stat().st_mtime  # made once, before step 1


# --- LoRA ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """(data, a trained tiny checkpoint folder) to fine-tune with adapters."""
    tmp = tmp_path_factory.mktemp("lora")
    data = shapes_data(tmp / "data", 40, 6)
    assert train_main("--data", data, "--out", tmp / "run", *FAST, "--batch-size", 8, "--max-steps", 30,
                      "--eval-every", 30) == 0
    return data, tmp / "run" / "last"


def test_lora_run_keeps_adapters_alone_and_caption_py_takes_them(base, tmp_path, capsys):
    data, init = base
    out = tmp_path / "run"
    assert train_main("--data", data, "--out", out, "--init", init, "--lora", 4, "--lr", 1e-2, "--log-every", 1,
                      "--num-beams", 1, "--batch-size", 8, "--max-steps", 6, "--eval-every", 3) == 0
    last = out / "last"
    assert not (last / "model.safetensors").exists()
    tensors = load_file(str(last / "adapter.safetensors"))
    assert tensors and all(k.endswith((".lora_A", ".lora_B", ".rows", ".ids")) for k in tensors)
    tok = load_tokenizer(init)  # --lora-tokens data: the rows of every token of the training sequences
    texts = [json.loads(line)["text"] for line in (data / "train" / "metadata.jsonl").read_text().splitlines()]
    expected = {tok.dec_id, tok.sep_id, *tok.tokens("a picture of")} | {i for t in texts for i in tok.tokens(t)}
    assert set(tensors["text_decoder.embeddings.word.ids"].tolist()) == expected
    full = (init / "model.safetensors").stat().st_size
    assert (last / "adapter.safetensors").stat().st_size < full / 4
    assert (last / json.loads((last / "adapter.json").read_text())["base"]).resolve() == init.resolve()  # relative
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("lora_B"))  # the adapters learned

    model = BlipCaptioner.from_pretrained(last)  # the base, checked by its hash, with the adapters
    assert adapters(model)
    images = [data / "val" / f"0000{i}.png" for i in range(3)]
    capsys.readouterr()
    assert caption.main([*map(str, images), "--checkpoint", str(last), "--beams", "1"]) == 0
    from_adapters = capsys.readouterr().out

    merged = tmp_path / "merged"  # folded into a full checkpoint: the same captions
    assert convert_weights.main(["--merge-lora", str(last), str(merged)]) == 0
    assert set(load_file(str(merged / "model.safetensors"))) == set(load_file(str(init / "model.safetensors")))
    capsys.readouterr()
    assert caption.main([*map(str, images), "--checkpoint", str(merged), "--beams", "1"]) == 0
    assert capsys.readouterr().out.replace(str(merged), "") == from_adapters.replace(str(last), "")


def test_lora_folder_exports_to_hf_with_the_same_logits(base, tmp_path):
    from transformers import BlipForConditionalGeneration

    data, init = base
    out = tmp_path / "run"
    assert train_main("--data", data, "--out", out, "--init", init, "--lora", 4, "--lr", 1e-2, "--num-beams", 1,
                      "--batch-size", 8, "--max-steps", 3, "--eval-every", 3) == 0
    assert convert_weights.main(["--to-hf", str(out / "last"), str(tmp_path / "hf")]) == 0
    ours = BlipCaptioner.from_pretrained(out / "last")
    hf = BlipForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64, generator=g)
    ids = torch.randint(5, ours.config.text.vocab_size - 2, (2, 7), generator=g)
    ids[:, 0] = ours.config.text.bos_token_id
    with torch.no_grad():
        expected = hf(pixel_values=pixels, input_ids=ids).logits
        assert torch.allclose(ours(pixels, ids), expected, atol=1e-4)


def test_lora_folder_refuses_a_changed_base(base, tmp_path, capsys):
    data, init = base
    copy = tmp_path / "base"
    copy.mkdir()
    for f in init.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "run"
    assert train_main("--data", data, "--out", out, "--init", copy, "--lora", 2, "--num-beams", 1,
                      "--batch-size", 8, "--max-steps", 1) == 0
    weights = load_file(str(copy / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    save_file(weights, str(copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match="changed"):
        BlipCaptioner.from_pretrained(out / "last")
    capsys.readouterr()
    assert caption.main([str(data / "val" / "00000.png"), "--checkpoint", str(out / "last")]) == 1
    err = capsys.readouterr().err
    assert "changed" in err and len(err.strip().splitlines()) == 1


def test_lora_run_resumes_bit_identical(base, tmp_path):
    data, init = base
    whole, killed = killed_and_resumed_equals_whole(tmp_path, "--data", data, "--init", init, "--lora", 4,
                                                    "--lr", 1e-2, "--log-every", 1, "--num-beams", 1,
                                                    "--augment", "flip")
    a, b = (load_file(str(r / "last" / "adapter.safetensors")) for r in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_needs_a_checkpoint(tmp_path, capsys):
    data = shapes_data(tmp_path / "data", 4, 2)
    assert train_main("--data", data, "--out", tmp_path / "run", *FAST, "--lora", 4, "--max-steps", 1) == 1
    assert "--init" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--data", str(data), "--lora", "4", "--lora-targets", "qkv,nothing"])
    assert "nothing" in capsys.readouterr().err


# --- small-set guards ----------------------------------------------------------------------------
def test_patience_stops_after_evaluations_without_progress(tmp_path, capsys):
    data = shapes_data(tmp_path / "data", 16, 4)
    out = tmp_path / "run"
    # lr 0: the weights never move, so no evaluation beats the first
    assert train_main("--data", data, "--out", out, *FAST, "--batch-size", 4, "--max-steps", 20, "--eval-every", 2,
                      "--lr", 0, "--patience", 2) == 0
    assert [r["step"] for r in records(out, "eval")] == [0, 2, 4]
    assert json.loads((out / "last" / "training.json").read_text())["step"] == 4
    assert "--patience 2" in capsys.readouterr().err and (out / "best" / "model.safetensors").is_file()


def test_eval_data_and_a_report_on_one_footing(tmp_path):
    data = shapes_data(tmp_path / "data", 16, 4)
    other = shapes_data(tmp_path / "other", 2, 3, seed=9)
    out = tmp_path / "run"
    assert train_main("--data", data, "--out", out, *FAST, "--batch-size", 8, "--max-steps", 4, "--eval-every", 2,
                      "--eval-data", other) == 0
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all({"val_loss", "cider", "exact", "bleu4"} <= set(r["eval_sets"]["other"]) for r in evals)
    assert evals[0]["eval_sets"]["other"]["val_loss"] != evals[0]["val_loss"]  # another set, another number
    logs = records(out, "train")
    assert all(r["nll"] < r["loss"] for r in logs)  # label smoothing 0.1 raises the objective above the NLL
    page = (out / "report.html").read_text()
    assert "loss (no label smoothing)" in page and "other CIDEr-D" in page


def test_adapter_folders_find_their_base_when_moved(base, tmp_path, monkeypatch):
    """adapter.json names its base relative to itself: a project copied elsewhere whole still loads; a base
    moved away is found near the folder by its hash, which is computed once per file."""
    import hashlib
    import shutil

    data, init = base
    project = tmp_path / "project"
    shutil.copytree(init, project / "checkpoints" / "start")
    assert train_main("--data", data, "--out", project / "runs" / "mine", "--init", project / "checkpoints" / "start",
                      "--lora", 2, "--num-beams", 1, "--batch-size", 8, "--max-steps", 1) == 0
    expected = logits_of(BlipCaptioner.from_pretrained(project / "runs" / "mine" / "last"))
    moved = tmp_path / "elsewhere"
    shutil.move(project, moved)  # the whole project: the relative path still holds
    assert torch.equal(logits_of(BlipCaptioner.from_pretrained(moved / "runs" / "mine" / "last")), expected)
    shutil.move(moved / "checkpoints" / "start", moved / "runs" / "start-renamed")  # the base alone: by its hash
    hashed = []
    digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, name: hashed.append(f.name) or digest(f, name))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for _ in range(2):
        assert torch.equal(logits_of(BlipCaptioner.from_pretrained(moved / "runs" / "mine" / "last")), expected)
    assert len(hashed) == len(set(hashed)) >= 1  # every file hashed at most once, then remembered
    shutil.rmtree(moved / "runs" / "start-renamed")
    with pytest.raises(CheckpointError, match="no checkpoint with those weights"):
        BlipCaptioner.from_pretrained(moved / "runs" / "mine" / "last")


def logits_of(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.text.vocab_size - 2, (1, 6), generator=g)
    ids[:, 0] = model.config.text.bos_token_id
    with torch.no_grad():
        return model(torch.randn(1, 3, 64, 64, generator=g), ids)


def test_merge_refuses_to_write_onto_its_own_folder_or_its_base(base, tmp_path, capsys):
    data, init = base
    copy = tmp_path / "start"
    copy.mkdir()
    for f in init.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "run"
    assert train_main("--data", data, "--out", out, "--init", copy, "--lora", 2, "--num-beams", 1,
                      "--batch-size", 8, "--max-steps", 1) == 0
    before = (copy / "model.safetensors").read_bytes()
    for target, why in ((out / "last", "adapter folder itself"), (copy, "checkpoint its adapters belong to")):
        capsys.readouterr()
        assert convert_weights.main(["--merge-lora", str(out / "last"), str(target)]) == 1
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1
    assert (copy / "model.safetensors").read_bytes() == before and (out / "last" / "adapter.json").is_file()


def test_token_cache_knows_its_precision_and_its_size(tmp_path, capsys, monkeypatch):
    """The key names the precision the tokens were made in (a bf16 cache is not reused in fp32); the size is
    said before the first picture, and a disk without room for it is a one-line error before any work."""
    data = shapes_data(tmp_path / "data", 8, 2)
    common = ["--data", data, *FAST, "--freeze-vision", "--cache-image-tokens", "--augment", "flip",
              "--batch-size", 4, "--max-steps", 2, "--save-every", 1]
    out = tmp_path / "run"
    assert train_main(*common, "--out", out, "--max-steps", 1) == 0
    assert "16 views x 65 x 128 float32" in capsys.readouterr().err  # 8 pictures, each as it is and mirrored
    key = json.loads((out / "image_tokens" / "key.json").read_text())
    assert key["precision"] == "off"
    assert train_main("--out", out, "--resume", "--amp", "bf16") == 0
    assert json.loads((out / "image_tokens" / "key.json").read_text())["precision"] == "bf16"  # made again

    import shutil
    from types import SimpleNamespace

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12, free=1000))
    capsys.readouterr()
    assert train_main(*common, "--out", tmp_path / "full-disk") == 1
    err = capsys.readouterr().err
    assert "GB free" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "full-disk" / "image_tokens").exists()


def test_token_cache_shares_fill_the_one_file(tmp_path):
    """Processes that each compute a share of the views make the same file as one process computing all."""
    import random as rnd
    from contextlib import nullcontext

    from blip.config import tiny
    from blip.image import TrainTransform
    from blip.tool.data import read_folder
    from blip.tool.token_cache import ImageTokens

    shapes.write_split(tmp_path / "pics", 5, rnd.Random(0), side=64)
    rows = read_folder(tmp_path / "pics").rows
    vit = BlipCaptioner(tiny()).visual_encoder
    transform = TrainTransform(64, "flip")
    for name, shares in (("one", [range(10)]), ("two", [range(0, 5), range(5, 10)])):
        ImageTokens.create(tmp_path / name, (10, vit.cfg.num_tokens, vit.cfg.width))
        for share in shares:
            ImageTokens.fill(tmp_path / name, share, vit, rows, transform, 3, nullcontext)
    a, b = (np.load(tmp_path / n / "tokens.npy") for n in ("one", "two"))
    assert np.array_equal(a, b) and np.abs(a).sum() > 0
