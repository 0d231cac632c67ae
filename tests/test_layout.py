"""The layout says which file is which (docs/reading-tour.md): blip/*.py is BLIP itself, blip/tool/ the
tool around it, blip/speed/ what only makes it fast. Imports point one way: tool -> blip -> speed."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = {"speed": 0, "core": 1, "tool": 2}  # a file may import from its own kind or a lower one


def kind(module: str) -> str:
    """"blip.tool.data" -> "tool", "blip.speed.linear" -> "speed", "blip.vit" / "blip" -> "core"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("tool", "speed") else "core"


def imports(path: Path, root: Path = ROOT) -> list[str]:
    """The blip modules a file imports, as absolute names (relative imports resolved)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])  # e.g. "blip.tool"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from ..config import x, in blip/speed/: blip.config
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found += [f"{base}.{a.name}" for a in node.names] if node.module is None else [base]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return [m for m in found if m.split(".")[0] == "blip"]


def wrong_way(path: Path, root: Path = ROOT) -> list[str]:
    """The modules `path` (under `root`) imports from a higher kind than its own."""
    own = kind(".".join(path.relative_to(root).with_suffix("").parts))
    return [m for m in imports(path, root) if KINDS[kind(m)] > KINDS[own]]


def test_imports_point_one_way():
    files = list((ROOT / "blip").rglob("*.py"))
    assert len(files) > 20
    bad = {str(p.relative_to(ROOT)): wrong_way(p) for p in files if wrong_way(p)}
    assert not bad, f"imports against the layout (tool -> blip -> speed): {bad}"


def test_the_check_sees_a_wrong_import(tmp_path):
    """A model file importing from the tool, and a speed file importing the model, are both caught."""
    (tmp_path / "blip" / "speed").mkdir(parents=True)
    (tmp_path / "blip" / "vit.py").write_text("from .tool.data import x\nfrom .speed import linear\n")
    (tmp_path / "blip" / "speed" / "fast.py").write_text("from ..config import y\nfrom . import memory\n")
    assert wrong_way(tmp_path / "blip" / "vit.py", tmp_path) == ["blip.tool.data"]
    assert wrong_way(tmp_path / "blip" / "speed" / "fast.py", tmp_path) == ["blip.config"]


def test_top_level_stays():
    """The design card's top level: the package, the three scripts, tests, requirements, README."""
    for name in ("blip", "train.py", "caption.py", "convert_weights.py", "tests", "requirements.txt", "README.md"):
        assert (ROOT / name).exists(), name


def test_train_py_reads_in_stages():
    """train.py is read to learn how BLIP is fine-tuned: no function a reader must hold in mind at once
    is over 80 lines, and the loop itself fits a screen (STYLE.md, habit 7)."""
    tree = ast.parse((ROOT / "train.py").read_text())
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, ast.FunctionDef)}
    assert max(lengths.values()) <= 80, max(lengths, key=lengths.get)
    assert lengths["train_loop"] <= 40 and lengths["main"] <= 40
