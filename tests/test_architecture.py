"""docs/architecture.md stays true where a machine can tell: every module path and every Python
name it puts in backticks exists in the source (read with `ast`, nothing imported); a file name
or manifest key it cites (`engine.plan`, `kv_cache_writes`) is a string the code holds."""

from __future__ import annotations

import ast
import keyword
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("export", "engines", "runner", "runner/backends", "bench", "bench/suites")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# Names the page cites from the codebases it compares with, or ONNX ops: defined outside llama405.
ELSEWHERE = {"KVCache", "LinearMethod", "BaseRunner", "DistCollective"}
MODULE = re.compile(r"(?P<path>[\w/]+\.py)(:(?P<names>[\w.]+))?")


@cache
def members(path: Path) -> dict[str, set[str]]:
    """Top-level names of a module -> the names inside each (class members, and "base:B" for each
    base class B; {} for others)."""
    tree = ast.parse(path.read_text())
    out: dict[str, set[str]] = {}
    for node in tree.body:
        targets = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            targets = [node.name]
        elif isinstance(node, ast.ClassDef):
            inner = {f"base:{b.id if isinstance(b, ast.Name) else getattr(b, 'attr', '')}" for b in node.bases}
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    inner.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    inner.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    inner.update(t.id for t in item.targets if isinstance(t, ast.Name))
            out[node.name] = inner
            continue
        elif isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        for name in targets:
            out.setdefault(name, set())
    return out


@cache
def string_literals() -> frozenset[str]:
    """Every string constant of the modules: the file names and manifest keys the page cites."""
    return frozenset(node.value for path in modules() for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.Constant) and isinstance(node.value, str))


def modules() -> list[Path]:
    return [p for package in PACKAGES for p in sorted((ROOT / package).glob("*.py"))]


def class_has(cls: str, member: str, depth: int = 0) -> bool:
    """`member` defined in class `cls` (any module) or inherited from one of its bases."""
    for path in modules():
        inner = members(path).get(cls)
        if inner is None:
            continue
        if member in inner:
            return True
        if depth < 5 and any(class_has(b[5:], member, depth + 1) for b in inner if b.startswith("base:")):
            return True
    return False


def defined(dotted: str, where: list[Path]) -> bool:
    """`name` or `Class.member` defined in one of `where`; a bare name may be a class member (the
    page lists `ExportOptions`' properties after it)."""
    head, _, rest = dotted.partition(".")
    for path in where:
        names = members(path)
        if head in names and (not rest or class_has(head, rest.split(".")[0])):
            return True
        if not rest and any(head in inner for inner in names.values()):
            return True
    return False


def backticked() -> list[str]:
    return re.findall(r"`([^`]+)`", DOC.read_text())


def test_every_module_the_page_names_exists():
    missing = []
    for token in backticked():
        match = MODULE.fullmatch(token)
        if match is None:
            continue
        path = match["path"]
        found = [p for p in [ROOT / path] + [ROOT / package / path for package in PACKAGES] if p.is_file()]
        if not found:
            missing.append(token)
        elif match["names"] and not all(defined(n, found) for n in match["names"].split(",")):
            missing.append(token)
    assert not missing, f"docs/architecture.md names modules or names that do not exist: {missing}"


def test_every_python_name_the_page_names_exists():
    everywhere = modules()
    missing = []
    for token in backticked():
        name = token.split("(")[0].strip()  # `infer(feed, rows)` names infer
        if MODULE.fullmatch(token) or not IDENTIFIER.fullmatch(name) or keyword.iskeyword(name):
            continue
        if "_" not in name and "." not in name and not name[:1].isupper():
            continue  # a plain word (`start`, `static`): prose, not a definition to look up
        if name not in ELSEWHERE and not defined(name, everywhere) and name not in string_literals():
            missing.append(name)
    assert not missing, f"docs/architecture.md names Python names no module defines: {missing}"


def test_the_check_can_fail():
    assert not defined("ExportOptions.no_such_member", modules())
    assert not defined("no_such_function", modules())
    assert defined("ExportOptions.model_options", modules()) and defined("io_names", modules())


def test_every_module_imports():
    """A module no test imports can rot unseen (bench/fp8_ablation.py once imported a name that had
    moved): each module of the packages is imported in a fresh interpreter (import errors only;
    a module's main() does not run)."""
    import subprocess
    import sys
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts) for package in PACKAGES
               for p in sorted((ROOT / package).glob("*.py")) if p.name != "__main__.py"]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)"
    run = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
