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
from blip.tool.evaluate import Evaluator

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


# --- where the stages meet --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(data, a trained tiny checkpoint folder)."""
    tmp = tmp_path_factory.mktemp("trained")
    data = shapes_data(tmp / "data", 24, 4)
    assert train_main("--data", data, "--out", tmp / "run", *FAST, "--batch-size", 8, "--max-steps", 6) == 0
    return data, tmp / "run" / "last"


def trainable_line(err: str) -> tuple[float, float]:
    words = err.split("training ", 1)[1].split()
    return float(words[0]), float(words[3])  # "plan: training 1.23 M of 1.2 M parameters"


def test_init_from_a_lora_run_trains_every_weight(trained, tmp_path, capsys):
    """A --lora run's folder as --init (without --lora): its adapters are merged, then every weight trains."""
    data, init = trained
    lora = tmp_path / "lora"
    assert train_main("--data", data, "--out", lora, "--init", init, "--lora", 2, "--lr", 1e-2, "--num-beams", 1,
                      "--batch-size", 8, "--max-steps", 2) == 0
    capsys.readouterr()
    full = tmp_path / "full"
    assert train_main("--data", data, "--out", full, "--init", lora / "last", "--num-beams", 1, "--batch-size", 8,
                      "--max-steps", 1, "--lr", 1e-3) == 0
    trainable, total = trainable_line(capsys.readouterr().err)
    assert round(trainable, 1) == total  # the log rounds the total to 0.1 M
    merged = BlipCaptioner.from_pretrained(lora / "last")
    from blip.lora import merge_lora

    merge_lora(merged)
    start, after = merged.state_dict(), load_file(str(full / "last" / "model.safetensors"))
    for name in ("visual_encoder.blocks.0.attn.qkv.weight", "visual_encoder.blocks.0.norm1.weight",
                 "text_decoder.layers.0.self_attn.query.weight", "text_decoder.layers.0.mlp.fc2.bias"):
        assert not torch.equal(start[name], after[name]), name  # trained, adapted layers or not


def usage_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        train.parse_args([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_lora_targets_are_never_rewritten(capsys):
    lora = ["--data", "d", "--lora", "4"]
    assert train.parse_args([*lora]).lora_targets == ",".join(train.LORA_TARGETS)
    assert train.parse_args([*lora, "--freeze-vision"]).lora_targets == "query,key,value,out,text.fc1,text.fc2"
    assert train.parse_args([*lora, "--freeze-vision", "--lora-targets", "text.fc1,query"]).lora_targets \
        == "text.fc1,query"
    assert train.parse_args([*lora, "--lora-targets", "vision.fc1"]).lora_targets == "vision.fc1"
    err = usage_error(capsys, *lora, "--freeze-vision", "--lora-targets", "vision.fc1")
    assert "vision.fc1" in err and "--freeze-vision" in err and "text.fc1" in err
    assert "text.fc1" in usage_error(capsys, *lora, "--freeze-vision", "--lora-targets", "query,fc1")
    err = usage_error(capsys, *lora, "--freeze-vision", "--lora-targets", "qkv")
    assert "qkv" in err and "query, key, value" in err


def test_resume_refuses_what_cannot_change(trained, tmp_path, capsys):
    data, init = trained
    out = tmp_path / "run"
    assert train_main("--data", data, "--out", out, "--init", init, "--lora", 2, "--num-beams", 1, "--batch-size", 8,
                      "--max-steps", 2, "--save-every", 1) == 0
    state = json.loads((out / "last" / "training.json").read_text())
    assert state["args"]["device"] == "auto"  # as given, so another machine resolves it anew
    for flags, said in ((["--lora", 4], "--lora 2"), (["--lora-alpha", 1], "--lora-alpha 4.0"),
                        (["--lora-targets", "query"], "--lora-targets qkv,proj"),
                        (["--freeze-vision"], "without --freeze-vision"), (["--batch-size", 4], "--batch-size 8"),
                        (["--seed", 1], "--seed 0"), (["--data", init], f"--data {data}")):
        capsys.readouterr()
        assert train_main("--out", out, "--resume", *flags) == 1
        err = capsys.readouterr().err
        assert f"{flags[0]} cannot change on --resume" in err and said in err, err
        assert len(err.strip().splitlines()) == 1
    assert json.loads((out / "last" / "training.json").read_text()) == state  # refused runs change nothing


def test_resume_takes_what_can_change(trained, tmp_path):
    data, _ = trained
    out = tmp_path / "run"
    assert train_main("--data", data, "--out", out, *FAST, "--batch-size", 8, "--max-steps", 2) == 0
    same_data = data.resolve()  # spelled another way, the same folder
    assert train_main("--out", out, "--resume", "--data", same_data, "--max-steps", 4, "--lr", 5e-4,
                      "--warmup", 0, "--device", "cpu", "--log-every", 2, "--eval-every", 4) == 0
    state = json.loads((out / "last" / "training.json").read_text())
    assert state["step"] == 4
    assert {k: state["args"][k] for k in ("max_steps", "lr", "device", "log_every")} == \
        {"max_steps": 4, "lr": 5e-4, "device": "cpu", "log_every": 2}
    logs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert [r["step"] for r in logs] == [1, 2, 4]
    assert logs[-1]["lr"] == pytest.approx(train.lr_at(3, 4, 5e-4, 0))  # the new schedule ran


# --- saves that survive any interruption --------------------------------------------------------------------
FILE_OPERATIONS = [(os, "replace"), (os, "fsync"), (os, "unlink"), (os, "rmdir"), (Path, "mkdir"), (Path, "write_text")]


def die_at_operation(k: int):
    """From now on, count this process's file operations; SIGKILL it just before the k-th. rmtree's own
    unlinks and rmdirs count one by one, so a kill can leave a folder half deleted."""
    import blip.checkpoint
    from blip.tokenizer import Tokenizer

    count = [0]

    def counted(fn):
        def operation(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return operation

    for owner, name in [*FILE_OPERATIONS, (blip.checkpoint, "save_file"), (Tokenizer, "save")]:
        setattr(owner, name, counted(getattr(owner, name)))


def check_checkpoints(out: Path, run, before: dict):
    """What the next run finds after recovery: last/ and best/ load; best/'s recorded scores are those of
    its weights (evaluated again); last/ is the step before the save or the step after, whole."""
    train.recover_outputs(out)
    assert not [p.name for p in out.iterdir() if p.name.endswith((".old",))]
    for name in ("best", "last"):
        assert (out / name).is_dir() or name not in before, f"{name}/ lost"
    if (out / "best").is_dir():
        recorded = read_evaluation(out / "best")
        model = BlipCaptioner.from_pretrained(out / "best").train()
        again = Evaluator(model, run.setup.tokenizer, run.batches.collate, run.batches.batch)(run.data.val.rows)
        assert again["val_loss"] == pytest.approx(recorded["val_loss"], rel=1e-6)
        assert again["cider"] == pytest.approx(recorded["cider"], abs=1e-9)
    if (out / "last").is_dir():
        state, _ = load_training_state(out / "last")
        weights = load_file(str(out / "last" / "model.safetensors"))
        if state["step"] == run.step:
            expected = {k: v.detach().cpu() for k, v in run.setup.model.state_dict().items()}
        else:
            assert state["step"] == before["last"], "last/ is neither the old step nor the new"
            expected = before["last_weights"]
        assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)


def test_a_save_killed_at_any_file_operation_leaves_whole_checkpoints(tmp_path, monkeypatch):
    """Each save of a short run (best/ and last/, first and replacing) is tried again and again in a forked
    process that is SIGKILLed before its 1st, 2nd, ... file operation, until one finishes; after every kill,
    what the next run recovers is checked. Then a run killed mid-swap resumes to the uninterrupted run's end."""
    data = shapes_data(tmp_path / "data", 16, 4)
    out, snapshot = tmp_path / "run", tmp_path / "snapshot"
    flags = ["--data", data, *FAST, "--batch-size", 8, "--max-steps", 2, "--eval-every", 1, "--save-every", 1]
    save, evaluate = train.Run.save, train.Run.evaluate
    tried, mid_swap = [], {"best": tmp_path / "best-mid-swap", "last": tmp_path / "last-mid-swap"}

    def every_evaluation_is_best(self):  # so that best/ is replaced too, not only written once
        self.best = None
        return evaluate(self)

    def killed_at_each_operation(self, folder, state=False, evaluation=None):
        shutil.copytree(out, snapshot)
        before = {p.name: None for p in out.iterdir()}
        if (out / "last").is_dir():
            before["last"] = load_training_state(out / "last")[0]["step"]
            before["last_weights"] = load_file(str(out / "last" / "model.safetensors"))
        k = 0
        while True:
            k += 1
            pid = os.fork()
            if pid == 0:  # the child: the save, killed before its k-th file operation
                code = 1
                try:
                    die_at_operation(k)
                    save(self, folder, state, evaluation)
                    code = 0
                finally:
                    os._exit(code)
            status = os.waitpid(pid, 0)[1]
            if not os.WIFSIGNALED(status):
                assert os.waitstatus_to_exitcode(status) == 0, "the save failed"
                break  # it finished: k - 1 operations, each of them tried
            for name in ("best", "last"):  # killed between the two renames: NAME/ is gone, NAME.old/ whole
                resumable = (out / "last").exists() or (out / "last.old").exists()
                if resumable and not (out / name).exists() and (out / f"{name}.old").exists() \
                        and not mid_swap[name].exists():
                    shutil.copytree(out, mid_swap[name])
            check_checkpoints(out, self, before)
            shutil.rmtree(out)
            shutil.copytree(snapshot, out)
        shutil.rmtree(snapshot)
        tried.append((folder.name, "replacing" if folder.name in before else "first", k - 1))
        return save(self, folder, state, evaluation)

    monkeypatch.setattr(train.Run, "evaluate", every_evaluation_is_best)
    monkeypatch.setattr(train.Run, "save", killed_at_each_operation)
    assert train_main(*flags, "--out", out) == 0
    kinds = {(name, how) for name, how, _ in tried}
    assert kinds == {("best", "first"), ("best", "replacing"), ("last", "first"), ("last", "replacing")}
    assert all(n >= 8 for _, _, n in tried), tried
    monkeypatch.setattr(train.Run, "save", save)  # a run killed mid-swap, resumed, ends as the whole one did
    for killed in mid_swap.values():
        assert train_main("--out", killed, "--resume") == 0
        for name in ("best", "last"):
            a, b = (load_file(str(r / name / "model.safetensors")) for r in (out, killed))
            assert all(torch.equal(a[k], b[k]) for k in a), (killed.name, name)


def test_a_swap_never_drops_the_only_whole_copy(tmp_path):
    """A swap cut short between its renames leaves NAME.old alone; the next swap, killed before each of its
    file operations, always leaves one whole copy (old or new) that recovery finds."""
    from blip.checkpoint import recover_folder, replace_folder

    def folder_of(path: Path, text: str):
        path.mkdir()
        for name in ("a", "b", "c"):
            (path / name).write_text(text)

    for k in range(1, 100):
        root = tmp_path / str(k)
        root.mkdir()
        folder_of(root / "x.old", "old")  # x/ itself is missing
        folder_of(root / "x.tmp", "new")
        pid = os.fork()
        if pid == 0:
            try:
                die_at_operation(k)
                replace_folder(root / "x.tmp", root / "x")
            finally:
                os._exit(0)
        killed = os.WIFSIGNALED(os.waitpid(pid, 0)[1])
        recover_folder(root / "x")
        texts = {(root / "x" / name).read_text() for name in ("a", "b", "c")}
        assert texts in ({"old"}, {"new"}), (k, texts)
        if not killed:
            assert texts == {"new"} and k > 3
            return
    raise AssertionError("the swap never finished")
