"""The code's shape: modules and functions small enough to read, and docs/architecture.md true to the tree."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _sources(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def test_pipelines_modules_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in _sources("pipelines")
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_functions_stay_short():
    long = {}
    for p in _sources("pipelines") + _sources("gradmimic"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(ROOT)}:{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_architecture_doc_describes_the_layout_that_is_there():
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = {p.name for p in _sources("pipelines") + _sources("gradmimic") if p.name != "__init__.py"}
    named = set(re.findall(r"`(\w+\.py)`", text))
    assert sorted(named - modules) == [], "docs/architecture.md names modules that are not there"
    assert sorted(modules - named) == [], "docs/architecture.md does not name these modules"
    packages = {str(p.parent.relative_to(ROOT)) + "/" for p in _sources("pipelines") if p.name == "__init__.py"}
    folders = set(re.findall(r"`((?:pipelines|gradmimic)/(?:\w+/)*)`", text))
    assert sorted(packages - folders) == [], "docs/architecture.md does not describe these packages"
    assert sorted(f for f in folders if not (ROOT / f).is_dir()) == [], "docs/architecture.md names missing folders"


def test_docstrings_cite_documents_in_the_repository():
    for p in _sources("pipelines") + _sources("gradmimic"):
        assert "DESIGN.md" not in p.read_text(), f"{p.relative_to(ROOT)} cites a document outside the repository"
