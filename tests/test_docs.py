"""The documentation cannot rot: every Python example in README.md and docs/ runs here, on a tiny
checkpoint made by the test, and every relative link and image path points at something that exists
(a `#anchor` at a heading of the file it names)."""

import re
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
