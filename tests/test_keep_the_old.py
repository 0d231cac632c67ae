"""Fine-tuning that keeps what the model knew: blends of the start and the fine-tuned weights (blend.py,
train.py --blend) whose ends are the two models exactly, for full and LoRA fine-tunes; replayed pictures
in every batch (--replay), which at fraction 0 change nothing, bit for bit."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import FAST, shapes_data, train_main

import blend
import train
from blip import BlipCaptioner
from blip.checkpoint import read_evaluation
from blip.tool.blend import Blender, choose


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A trained tiny model (start), and a full and a LoRA fine-tune of it on other pictures, each with
    the start's own pictures as --eval-data."""
    tmp = tmp_path_factory.mktemp("blend")
    old, new = shapes_data(tmp / "old", 24, 4), shapes_data(tmp / "new", 16, 4, seed=7)
    assert train_main("--data", old, "--out", tmp / "start", *FAST, "--batch-size", 8, "--max-steps", 8) == 0
    start = tmp / "start" / "last"
    common = ["--data", new, "--init", start, "--eval-data", old, "--num-beams", 1, "--batch-size", 8,
              "--max-steps", 4, "--eval-every", 2]
    assert train_main(*common, "--out", tmp / "full", "--lr", 3e-3) == 0
    assert train_main(*common, "--out", tmp / "lora", "--lora", 4, "--lr", 1e-2) == 0
    return {"old": old, "new": new, "start": start, "full": tmp / "full", "lora": tmp / "lora"}


def logits(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64, generator=g)
    ids = torch.randint(5, model.config.text.vocab_size - 2, (2, 9), generator=g)
    ids[:, 0] = model.config.text.bos_token_id
    with torch.no_grad():
        return model.eval()(pixels, ids)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_blend_ends_are_the_start_and_the_tuned_model_exactly(runs, kind):
    tuned = runs[kind] / "last"
    blender = Blender(runs["start"], tuned)
    start, fine = BlipCaptioner.from_pretrained(runs["start"]), BlipCaptioner.from_pretrained(tuned)
    blender.set(0.0)
    assert torch.equal(logits(blender.model), logits(start))
    blender.set(1.0)
    assert torch.equal(logits(blender.model), logits(fine))
    blender.set(0.5)
    middle = logits(blender.model)
    assert not torch.allclose(middle, logits(start)) and not torch.allclose(middle, logits(fine))
    if kind == "full":  # (1 - a) start + a tuned, weight by weight
        a, b, m = start.state_dict(), fine.state_dict(), blender.model.state_dict()
        assert all(torch.allclose(m[k], (a[k] + b[k]) / 2, atol=1e-7) for k in a if a[k].is_floating_point())


def test_blend_py_prints_the_curve_and_writes_the_choice(runs, capsys):
    capsys.readouterr()
    assert blend.main([str(runs["full"]), "--alphas", "0", "0.5", "1", "--keep", "0.5"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.strip().startswith(("0.00", "0.50", "1.00"))]) == 3
    written = runs["full"] / "blend"
    chosen = read_evaluation(written)
    assert chosen["alpha"] in (0, 0.5, 1) and [r["alpha"] for r in chosen["curve"]] == [0, 0.5, 1]
    assert set(chosen["eval_sets"]) == {"old"}
    start = chosen["curve"][0]["eval_sets"]["old"]["cider"]
    assert chosen["eval_sets"]["old"]["cider"] >= 0.5 * start  # kept at least half of what the start knew
    blender = Blender(runs["start"], runs["full"] / "best")
    blender.set(chosen["alpha"])
    assert torch.equal(logits(BlipCaptioner.from_pretrained(written)), logits(blender.model))


def test_a_lora_blend_is_an_adapter_folder(runs, tmp_path):
    out = tmp_path / "blend"
    assert blend.main([str(runs["lora"]), "--alphas", "0", "1", "--alpha", "0", "--out", str(out)]) == 0
    assert (out / "adapter.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert torch.equal(logits(BlipCaptioner.from_pretrained(out)), logits(BlipCaptioner.from_pretrained(runs["start"])))


def test_choose_keeps_the_old_then_takes_the_best_new():
    def point(a, new, old):
        return {"alpha": a, "val": {"cider": new}, "eval_sets": {"old": {"cider": old}}}

    curve = [point(0, 1.0, 8.0), point(0.5, 6.0, 6.0), point(0.75, 7.0, 3.0), point(1, 7.5, 1.0)]
    assert choose(curve, None)["alpha"] == 1  # the best on the new pictures
    assert choose(curve, 0.7)["alpha"] == 0.5  # 6.0 >= 0.7 x 8, and 7.0 / 7.5 forget too much
    assert choose(curve, 0.99)["alpha"] == 0
    assert choose([point(0, 2.0, 8.0), point(1, 2.0, 8.0)], None)["alpha"] == 1  # of equals, the larger a


def test_train_py_blend_at_the_end(runs, tmp_path):
    out = tmp_path / "run"
    assert train_main("--data", runs["new"], "--init", runs["start"], "--eval-data", runs["old"], "--num-beams", 1,
                      "--batch-size", 8, "--max-steps", 2, "--eval-every", 2, "--lr", 3e-3, "--blend", 0.8,
                      "--out", out) == 0
    chosen = read_evaluation(out / "blend")
    assert [r["alpha"] for r in chosen["curve"]] == [0, 0.25, 0.5, 0.75, 1]
    start = chosen["curve"][0]["eval_sets"]["old"]["cider"]
    assert chosen["eval_sets"]["old"]["cider"] >= 0.8 * start


# --- replay -----------------------------------------------------------------------------------------------
def batches_of(*argv) -> "train.Batches":
    args = train.parse_args([str(a) for a in argv])
    procs = train.Processes(torch.device("cpu"))
    data = train.read_data(args, procs)
    setup = train.build_model(args, procs, data)
    return train.Batches(args, procs, setup, data)


def test_replay_puts_its_share_in_every_batch(runs):
    b = batches_of("--data", runs["new"], "--init", runs["start"], "--replay", runs["old"], "--replay-fraction", 0.25,
                   "--batch-size", 8)
    assert (b.n_train, b.n_replay, b.batch, b.replayed) == (16, 24, 8, 2)
    steps = b.samples(0)
    seen = []
    for _ in range(24):  # two passes over the replay pairs
        batch = next(steps)
        replayed = [pair for pair, _ in batch if pair >= b.n_train]
        assert len(batch) == 8 and len(replayed) == 2
        seen += replayed
    assert sorted(seen[:24]) == sorted(seen[24:]) == list(range(16, 40))  # each once per pass
    later = b.samples(5)  # a resumed run draws what the whole run drew from there on
    whole = b.samples(0)
    for _ in range(5):
        next(whole)
    assert [next(later) for _ in range(10)] == [next(whole) for _ in range(10)]


def test_replay_fraction_zero_is_the_run_without_it(runs, tmp_path):
    common = ["--data", runs["new"], "--init", runs["start"], "--num-beams", 1, "--batch-size", 8, "--max-steps", 3,
              "--lr", 3e-3, "--dropout", 0.1, "--log-every", 1]
    assert train_main(*common, "--out", tmp_path / "plain") == 0
    assert train_main(*common, "--replay", runs["old"], "--replay-fraction", 0, "--out", tmp_path / "replay") == 0
    a, b = (load_file(str(tmp_path / r / "last" / "model.safetensors")) for r in ("plain", "replay"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[r for r in map(json.loads, (tmp_path / r / "metrics.jsonl").read_text().splitlines())]
            for r in ("plain", "replay")]
    assert [r.get("loss", r.get("val_loss")) for r in logs[0]] == [r.get("loss", r.get("val_loss")) for r in logs[1]]


def test_replay_changes_the_batches(runs, tmp_path):
    common = ["--data", runs["new"], "--init", runs["start"], "--num-beams", 1, "--batch-size", 8, "--max-steps", 3,
              "--lr", 3e-3, "--log-every", 1]
    assert train_main(*common, "--out", tmp_path / "plain") == 0
    assert train_main(*common, "--replay", runs["old"], "--out", tmp_path / "replay") == 0
    a, b = (load_file(str(tmp_path / r / "last" / "model.safetensors")) for r in ("plain", "replay"))
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(Path(tmp_path / "replay" / "last" / "training.json").read_text())["args"]["replay"]
