"""The layout the READMEs promise: every import is a plain import that resolves to a file of
this repository (what an IDE's go-to-definition and an import-graph tool follow), one import
by path at most, chapters readable in one sitting, step numbers equal to file numbers."""
import ast
import importlib.util
import re

import pytest
from conftest import ROOT

PROJECT = {"common", "summary", "stage1_adult", "stage2_ctr", "stage3_advanced"}
SOURCES = sorted(p for p in ROOT.rglob("*.py") if ".venv" not in p.parts
                 and "__pycache__" not in p.parts and "data" not in p.parts)
CHAPTERS = sorted(p for p in SOURCES if re.match(r"\d\d_", p.name)) + [
    ROOT / "stage2_ctr" / "train_ctr.py"]


def project_imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_every_project_import_resolves_to_a_file_here():
    unresolved = []
    for path in SOURCES:
        for name in project_imports(path):
            if name.split(".")[0] not in PROJECT:
                continue
            try:
                spec = importlib.util.find_spec(name)
            except ModuleNotFoundError:
                spec = None
            if spec is None:  # `from pkg.module import name`: the module part must resolve
                parent = importlib.util.find_spec(name.rsplit(".", 1)[0])
                ok = parent is not None and parent.origin and parent.origin.startswith(str(ROOT))
            else:
                ok = spec.origin is not None and spec.origin.startswith(str(ROOT))
            if not ok:
                unresolved.append(f"{path.relative_to(ROOT)}: {name}")
    assert not unresolved


def test_at_most_one_import_by_path():
    needle = "spec_from_" + "file_location"  # split, so this file does not count itself
    users = [p for p in SOURCES if needle in p.read_text()]
    assert [p.relative_to(ROOT).as_posix() for p in users] == ["tests/conftest.py"]


def test_sys_path_is_only_ever_the_repository_root():
    for path in SOURCES:
        for line in path.read_text().splitlines():
            if "sys.path.insert" in line and "code =" not in line:
                assert ("parents[1]" in line or "ROOT)" in line or "'.'" in line
                        or "tmp.name" in line), f"{path}: {line.strip()}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_chapter_is_readable_in_one_sitting(path):
    """A chapter <= 380 lines; the trainer reads best as one file (nanoGPT's train.py, nanochat's
    base_train.py), with the helpers only it uses inside: its own cap is 650."""
    text = path.read_text()
    assert text.count("\n") <= (650 if path.name == "train_ctr.py" else 380)
    head = ast.get_docstring(ast.parse(text))
    assert head and "What you learn here" in head and "Run:" in head
    number = re.match(r"(\d\d)_", path.name)
    step = re.match(r"Stage \d, step (\d+)", head)
    if number:
        assert step and int(step.group(1)) == int(number.group(1)), "step number != file number"


@pytest.mark.parametrize("path", [p for p in SOURCES if p not in CHAPTERS
                                  and "tests" not in p.relative_to(ROOT).parts],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_a_module_holds_one_idea(path):
    """A module a reader cannot finish in one sitting holds two ideas: <= ~500 lines."""
    assert path.read_text().count("\n") <= 520
