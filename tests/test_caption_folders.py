"""caption.py on real folders: the listing (symlinked folders once, hidden ones skipped, a stat per
folder), pictures known by their real path, append runs resumed without doubling, caption files and
names in any encoding, torchrun planned once, the parts of a killed torchrun run resumed by one process,
and no model loaded when nothing is left to do."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import caption
from blip.tool import listing
from blip.tool.listing import Listing, identity, shown
from tests.test_caption_dataset import ROOT, jsonl, killed_then_resumed, make_tree, run


def test_listing_follows_symlinked_folders_once_and_skips_hidden_ones(tmp_path, monkeypatch):
    paths = make_tree(tmp_path / "tree", 6)  # sub/ holds p00.jpg and p03.jpg
    (tmp_path / "tree" / "sub" / "loop").symlink_to(tmp_path / "tree")  # a loop
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.jpg").write_bytes(paths[0].read_bytes())
    (tmp_path / "tree" / "linked").symlink_to(tmp_path / "elsewhere")  # a folder kept somewhere else
    hidden = tmp_path / "tree" / ".ipynb_checkpoints"
    hidden.mkdir()
    (hidden / "h.jpg").write_bytes(paths[0].read_bytes())
    (tmp_path / "tree" / "._p01.jpg").write_bytes(b"macOS metadata, not a picture")
    (tmp_path / "tree" / "many").mkdir()
    for i in range(50):
        (tmp_path / "tree" / "many" / f"{i:02d}.jpg").write_bytes(b"")  # listed only: never opened here
    stats, real_stat = [], os.stat

    def counted(*args, **kwargs):
        stats.append(args[0])
        return real_stat(*args, **kwargs)

    monkeypatch.setattr(listing.os, "stat", counted)
    found = Listing([str(tmp_path / "tree")], progress=False)
    names = [str(p.relative_to(tmp_path / "tree")) for p, _ in found.pictures]
    assert names == ["linked/x.jpg", *[f"many/{i:02d}.jpg" for i in range(50)], "p01.png", "p02.webp", "p04.png",
                     "p05.webp", "sub/p00.jpg", "sub/p03.jpg"]
    assert len(stats) <= 6  # the argument, and one per folder (tree, linked, many, sub, the loop): none per picture
    assert not found.problems
    with_hidden = Listing([str(tmp_path / "tree")], hidden=True, progress=False)
    assert {p.name for p, _ in with_hidden.pictures} - {p.name for p, _ in found.pictures} == {"h.jpg", "._p01.jpg"}



def test_a_picture_is_known_by_its_real_path(tmp_path, monkeypatch):
    make_tree(tmp_path / "tree", 1)
    (tmp_path / "link").symlink_to(tmp_path / "tree")
    monkeypatch.chdir(tmp_path)
    spelled = ["tree/sub/p00.jpg", str(tmp_path / "tree" / "sub" / "p00.jpg"), "link/sub/../sub/p00.jpg",
               "./tree/sub/p00.jpg"]
    assert len({identity(s) for s in spelled}) == 1
    odd = Path(os.fsdecode(b"caf\xe9.jpg"))
    assert shown(odd) == "caf\\xe9.jpg" and identity(shown(odd)) == identity(odd)


def test_sidecar_suffix_of_a_picture_is_refused_before_anything_loads(tmp_path, capsys):
    paths = make_tree(tmp_path, 1)
    for ext in ("png", ".JPG", "webp"):
        with pytest.raises(SystemExit) as e:
            caption.main([str(tmp_path), "--sidecar", ext, "--checkpoint", str(tmp_path / "nowhere")])
        assert e.value.code == 2 and "would write each caption over a picture" in capsys.readouterr().err
    assert paths[0].read_bytes()[:3] == b"\xff\xd8\xff"


def test_nothing_left_loads_no_model_and_stale_temporary_files_go(hf_taught, tmp_path, capsys):
    _, folder = hf_taught
    tree = tmp_path / "tree"
    paths = make_tree(tree, 3)
    (tree / ".p01.txt.tmp-99999999").write_text("a kill left this")  # an earlier version's name
    (tree / ".p02.txt.tmp").write_text("a kill left this")
    assert run(capsys, tree, "--sidecar", "--checkpoint", folder)[0] == 0
    assert not list(tree.glob(".*.tmp*")) and all(p.with_suffix(".txt").is_file() for p in paths)
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    code, _, err = run(capsys, tree, "--sidecar", "--checkpoint", not_a_model)
    assert code == 0 and "nothing left to caption" in err and "3 of 3 pictures" in err


def test_append_killed_then_rerun_appends_once(hf_taught, tmp_path):
    _, folder = hf_taught
    tree = tmp_path / "tree"
    paths = make_tree(tree, 24)
    for p in paths:
        p.with_suffix(".txt").write_text("old\n")

    def appended():
        return sum(p.with_suffix(".txt").read_text().count("\n") == 2 for p in paths)

    killed_then_resumed(folder, tmp_path, tree, "--sidecar", "--existing", "append", count=appended)
    texts = [p.with_suffix(".txt").read_text().splitlines() for p in paths]
    assert all(len(t) == 2 and t[0] == "old" and t[1] for t in texts), texts
    assert not list(tree.glob(".caption-*.journal")) and not list(tree.rglob(".*.tmp"))


def test_a_journaled_picture_whose_rename_a_kill_cut_is_finished(hf_taught, tmp_path, capsys):
    _, folder = hf_taught
    paths = make_tree(tmp_path, 2)  # sub/p00.jpg, p01.png
    target = paths[1].with_suffix(".txt")
    target.write_text("old\n")
    (tmp_path / ".p01.txt.tmp").write_text("old\nnew\n")  # written whole, journaled, not yet renamed
    (tmp_path / ".caption-append.txt.journal").write_text(identity(paths[1]) + "\n")
    assert run(capsys, tmp_path, "--sidecar", "--existing", "append", "--checkpoint", folder)[0] == 0
    assert target.read_text() == "old\nnew\n"  # finished, not captioned again
    assert paths[0].with_suffix(".txt").read_text().count("\n") == 1
    assert not (tmp_path / ".caption-append.txt.journal").exists()


def test_any_encoding_of_old_captions_and_names(hf_taught, tmp_path, capsys):
    _, folder = hf_taught
    tree = tmp_path / "tree"
    paths = make_tree(tree, 2)
    odd = tree / os.fsdecode(b"caf\xe9.jpg")  # a name in latin-1, as old cameras and Windows tools write them
    paths[1].rename(odd)
    (tree / "p01.txt").unlink(missing_ok=True)
    odd.with_suffix(".txt").write_bytes("déjà vu, “quoted”".encode("cp1252"))
    paths[0].with_suffix(".txt").write_bytes("café".encode("latin-1"))
    code, _, err = run(capsys, tree, "--sidecar", "--existing", "append", "--checkpoint", folder)
    assert code == 0, err
    assert odd.with_suffix(".txt").read_text(encoding="utf-8").startswith("déjà vu, “quoted”\n")
    assert paths[0].with_suffix(".txt").read_text(encoding="utf-8").startswith("café\n")

    out = tmp_path / "c.jsonl"
    code, text, err = run(capsys, tree, "--checkpoint", folder)  # text on stdout
    assert code == 0 and "caf\\xe9.jpg: " in text
    assert run(capsys, tree, "--checkpoint", folder, "--format", "jsonl", "--output", out)[0] == 0
    assert run(capsys, tree, "--checkpoint", folder, "--format", "csv", "--output", tmp_path / "c.csv")[0] == 0
    records = jsonl(out)
    assert sorted(r["image"] for r in records) == sorted([str(paths[0]), str(tree / "caf\\xe9.jpg")])
    code, _, err = run(capsys, tree, "--checkpoint", folder, "--format", "jsonl", "--output", out, "--resume")
    assert code == 0 and "nothing left to caption" in err and jsonl(out) == records


def test_resume_knows_pictures_by_real_path_and_drops_superseded_errors(hf_taught, tmp_path, capsys, monkeypatch):
    _, folder = hf_taught
    paths = make_tree(tmp_path / "tree", 3)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "c.jsonl"
    broken = paths[2].read_bytes()
    paths[2].write_bytes(b"not yet a picture")
    assert run(capsys, "tree", "--checkpoint", folder, "--format", "jsonl", "--output", out)[0] == 1
    assert [r for r in jsonl(out) if "error" in r][0]["image"] == "tree/p02.webp"
    paths[2].write_bytes(broken)  # mended
    code, _, err = run(capsys, tmp_path / "tree", "--checkpoint", folder, "--format", "jsonl", "--output", out,
                       "--resume")  # the same folder, spelled absolute
    assert code == 0 and "2 of 3 pictures have their caption already" in err
    records = jsonl(out)
    assert [r["image"] for r in records] == ["tree/p01.png", "tree/sub/p00.jpg", str(tmp_path / "tree" / "p02.webp")]
    assert all("caption" in r for r in records)  # the error record is gone


def test_one_process_resumes_a_killed_torchrun_run_from_its_parts(hf_taught, tmp_path, capsys):
    _, folder = hf_taught
    paths = make_tree(tmp_path / "tree", 4)
    out = tmp_path / "c.jsonl"
    assert run(capsys, *paths, "--checkpoint", folder, "--format", "jsonl", "--output", out)[0] == 0
    whole = jsonl(out)
    out.unlink()
    for rank in (0, 1):  # what two processes wrote before a kill: a picture each
        Path(f"{out}.part-{rank}").write_text(json.dumps(whole[rank]) + "\n")
    with pytest.raises(SystemExit) as e:  # a run that would drop them is refused
        caption.main([*map(str, paths), "--checkpoint", str(folder), "--format", "jsonl", "--output", str(out)])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    code, _, err = run(capsys, *paths, "--checkpoint", folder, "--format", "jsonl", "--output", out, "--resume")
    assert code == 0 and "2 of 4 pictures have their caption already" in err
    assert sorted(map(json.dumps, jsonl(out))) == sorted(map(json.dumps, whole))
    assert not list(tmp_path.glob("c.jsonl.part-*"))


SLOW_RANK = """
import sys, time
sys.path.insert(0, {root!r})
import caption
started = caption.distributed
def late():  # the second process starts its work late, as on a busy machine
    rank, world = started()
    if rank == 1:
        time.sleep(5)
    return rank, world
caption.distributed = late
sys.exit(caption.main())
"""


def test_torchrun_with_a_late_process_captions_every_picture_once(hf_taught, tmp_path):
    _, folder = hf_taught
    tree = tmp_path / "tree"
    paths = make_tree(tree, 12)
    script = tmp_path / "late.py"
    script.write_text(SLOW_RANK.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run([*torchrun, str(tree), "--checkpoint", str(folder), "--sidecar", "--batch-size", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(p.with_suffix(".txt").read_text().count("\n") == 1 for p in paths)
