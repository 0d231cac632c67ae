"""The documentation cannot rot: every Python example in README.md and docs/ runs here, on a tiny
checkpoint made by the test; every command line of our scripts in a shell block parses with that script's own
argparse; every blip/ file and name the docs cite exists; every relative link and image path points at
something that exists (a `#anchor` at a heading of the file it names); and no doc reads as a lab notebook
(dates, commit ids, "an earlier run")."""

import ast
import importlib
import re
import shlex
import traceback
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def examples() -> list[tuple[str, str]]:
    """(where, code) of every ```python block: where is "FILE:LINE"."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            found.append((f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}", m.group(1)))
    return found


EXAMPLES = examples()


def run_example(where: str, code: str):
    """Run one example as a script of its own, named by where it is written."""
    exec(compile(code, where, "exec"), {"__name__": "__example__"})


@pytest.fixture
def example_dir(ours_tiny, tmp_path, monkeypatch):
    """What the examples name, in a fresh working folder: checkpoints/blip-base (the tiny checkpoint)
    and a few photos."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "blip-base").symlink_to(ours_tiny)
    rng = np.random.default_rng(0)
    for name in ("dog.jpg", "cat.png", "photo.jpg"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_there_are_examples():
    assert any(where.startswith("README.md") for where, _ in EXAMPLES)


@pytest.mark.parametrize("where,code", EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_example_runs(example_dir, where, code):
    run_example(where, code)


def test_a_broken_example_fails(example_dir):
    """The runner does fail: the README's first example with a method renamed raises, named by its place."""
    where, code = next((w, c) for w, c in EXAMPLES if ".caption(" in c)
    with pytest.raises(AttributeError) as e:
        run_example(where, code.replace(".caption(", ".kaption(", 1))
    assert where in [frame.filename for frame in traceback.extract_tb(e.value.__traceback__)]


def slug(heading: str) -> str:
    """A Markdown heading's anchor, as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = FENCE.sub("", doc.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def broken_links(doc: Path) -> list[str]:
    """The relative links and image paths of `doc` (outside code blocks) that point at nothing."""
    broken = []
    for target in LINK.findall(re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ... : not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_links_resolve(doc):
    assert broken_links(doc) == []


def test_link_check_finds_broken_links(tmp_path):
    """The check does look: a missing file, a missing heading and a missing image are all found."""
    doc = tmp_path / "x.md"
    doc.write_text("# A title, here\n\n[ok](#a-title-here) [bad](missing.md) [bad anchor](#nowhere)\n"
                   "![picture](gone.png) [web](https://example.com)\n")
    assert broken_links(doc) == ["missing.md: no such file", "#nowhere: no heading with that anchor",
                                 "gone.png: no such file"]


# --- command lines -------------------------------------------------------------------------------------
SCRIPTS = ("train", "caption", "convert_weights", "filter_data", "demo", "blend", "transfer", "caption_ray")
def shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every fenced block marked bash/sh/shell, or not marked at all."""
    blocks, fence, start, body = [], None, 0, []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.startswith("```"):
            if fence is None:
                fence, start, body = line[3:].strip(), n + 1, []
            else:
                if fence in ("", "bash", "sh", "shell"):
                    blocks.append((start, body))
                fence = None
        elif fence is not None:
            body.append(line)
    return blocks


def command_lines(text: str) -> list[tuple[int, str, list[str]]]:
    """(line, script, its arguments) of every call of one of SCRIPTS in the shell blocks of `text`: lines
    joined at a trailing backslash, comments dropped, `python X.py` after any prefix (.venv/bin/, torchrun)."""
    found = []
    for first, body in shell_blocks(text):
        lines = "\n".join(body).replace("\\\n", " ").splitlines()
        for n, line in enumerate(lines):
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                words = line.split()
            for i, word in enumerate(words):
                name = Path(word).name.removesuffix(".py")
                if word.endswith(".py") and name in SCRIPTS:
                    found.append((first + n, name, words[i + 1 :]))
                    break
    return found


def bad_command_lines(doc: Path) -> list[str]:
    """The command lines of `doc` that their script's argparse refuses (a flag it lacks, a bad choice)."""
    bad = []
    for line, script, args in command_lines(doc.read_text()):
        parser = importlib.import_module(script).build_parser()
        parser.exit = parser.error = lambda *a, **k: (_ for _ in ()).throw(ValueError(a[-1] if a else ""))
        try:
            parser.parse_args(args)
        except ValueError as e:
            bad.append(f"{doc.name}:{line}: {script}.py {' '.join(args)}: {e}")
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_command_lines_parse(doc):
    assert bad_command_lines(doc) == []


def test_there_are_command_lines():
    found = {script for doc in DOCS for _, script, _ in command_lines(doc.read_text())}
    assert {"train", "caption", "convert_weights", "blend", "transfer"} <= found


def test_a_flag_a_script_lacks_is_found(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("```bash\n.venv/bin/python train.py --data d --recompute full   # gone\n"
                   ".venv/bin/python caption.py a.jpg \\\n    --beams 3 --dtype fp64\n```\n")
    bad = bad_command_lines(doc)
    assert len(bad) == 2 and "--recompute" in bad[0] and "fp64" in bad[1] and bad[1].startswith("x.md:3:")


# --- what the docs cite ---------------------------------------------------------------------------------
CITED_FILE = re.compile(r"\b((?:blip|tests|benchmarks)/[\w/]+\.py)(?:[ :`]+(\w+))?")
CITED_NAME = re.compile(r"`([A-Za-z_][\w.]*)\(\)?`")


def defined_names() -> set[str]:
    """Every function, class and method name defined in our Python files."""
    names = set()
    for path in [*ROOT.glob("*.py"), *(ROOT / "blip").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names.add(node.name)
    return names


def missing_citations(text: str, names: set[str]) -> list[str]:
    missing = []
    for path, name in CITED_FILE.findall(text):
        if not (ROOT / path).is_file():
            missing.append(path)
        elif name and name[0].isupper() or name and "_" in name:  # a name after its file: defined there
            tree = ast.parse((ROOT / path).read_text())
            if name not in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)} | \
                    {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
                     if isinstance(t, ast.Name)}:
                missing.append(f"{path} {name}")
    for cited in CITED_NAME.findall(text):
        if cited.split(".")[-1] not in names:
            missing.append(f"{cited}()")
    return missing


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_cited_files_and_names_exist(doc):
    assert missing_citations(doc.read_text(), defined_names()) == []


def test_a_missing_citation_is_found():
    text = "see `blip/vit.py Block`, `blip/nowhere.py`, `blip/text.py NoSuchLayer` and `Captioner.kaption()`"
    assert missing_citations(text, defined_names()) == ["blip/nowhere.py", "blip/text.py NoSuchLayer",
                                                        "Captioner.kaption()"]


# --- a user guide, not a lab notebook -----------------------------------------------------------------------
HISTORY = re.compile(r"\b20\d\d-\d\d-\d\d\b|\b(?:commit|stop) [0-9a-f]{7,}\b|\b[0-9a-f]{7}\b(?=[ ,)])"
                     r"|an earlier (?:run|version|host)|a faster host|not found yet|left to try|in designing"
                     r"|this session|last stop|earlier sessions?", re.I)


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_no_lab_notebook(doc):
    found = [(doc.read_text().count("\n", 0, m.start()) + 1, m.group(0)) for m in HISTORY.finditer(doc.read_text())]
    assert found == []


def test_history_is_found():
    text = "Measured on 2026-11-30 (an earlier run on a faster host, commit 9ea13a3): not found yet."
    assert len(HISTORY.findall(text)) == 5


def test_the_reading_tour_covers_every_file_of_blip():
    tour = (ROOT / "docs" / "reading-tour.md").read_text()
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "blip").rglob("*.py"))
    assert [f for f in files if f"`{f}`" not in tour and f"{f}`" not in tour] == []


BARE = re.compile(r"^(?:python3? |torchrun |hf |pip |huggingface-cli )")  # tools that live in .venv/bin/


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_commands_run_as_pasted(doc):
    """Every tool a shell block calls is the one `make install` put in .venv/bin/ (not a bare name that may be
    missing, or another Python's)."""
    bare = [line for _, body in shell_blocks(doc.read_text()) for line in body if BARE.match(line.strip())]
    assert bare == []
