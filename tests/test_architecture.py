"""The shape of the code, checked: imports point one way, and runtime modules hold no code only tests call.

- ``shared`` imports neither app; neither app imports the other; no runtime module imports ``tests``.
- Every top-level function and class of a runtime module is used by runtime code (another module, the same
  module, or an entry point), not only by tests.
- ``docs/architecture.md`` names every runtime module, in a row of its module tables with what it owns, and no module
  that is gone.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNTIME = ("shared", "cpu_tracker_member", "cpu_tracker_aggregator")
FORBIDDEN = {
    "shared": ("cpu_tracker_member", "cpu_tracker_aggregator", "tests"),
    "cpu_tracker_member": ("cpu_tracker_aggregator", "tests"),
    "cpu_tracker_aggregator": ("cpu_tracker_member", "tests"),
}



def runtime_modules() -> list[Path]:
    return sorted(p for pkg in RUNTIME for p in (REPO / pkg).rglob("*.py"))


def imported(tree: ast.AST) -> set[str]:
    """Every module name the code imports, statically or through ``importlib.import_module("literal")``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value)
    return names


@pytest.mark.parametrize("path", runtime_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_one_way(path):
    package = path.relative_to(REPO).parts[0]
    bad = sorted(m for m in imported(ast.parse(path.read_text())) if m.split(".")[0] in FORBIDDEN[package])
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_runtime_modules_hold_no_code_only_tests_call():
    trees = {p: ast.parse(p.read_text()) for p in runtime_modules()}
    used: dict[str, int] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if isinstance(node, ast.alias):
                name = node.name.split(".")[-1]
            if name:
                used[name] = used.get(name, 0) + 1
    unused = []
    for path, tree in trees.items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not used.get(node.name):
                if path.name == "__main__.py" and node.name == "main":
                    continue  # the entry point, called by `if __name__ == "__main__"` and the console script
                unused.append(f"{path.relative_to(REPO)}: {node.name}")
    assert not unused, "defined in runtime code but used only by tests (or nowhere):\n" + "\n".join(unused)


ARCHITECTURE = REPO / "docs" / "architecture.md"
MODULE_ROW = re.compile(r"^\| `((?:%s)/[\w/]+\.py)` \| (.*\S.*) \|$" % "|".join(RUNTIME), re.MULTILINE)
NAMED_MODULE = re.compile(r"`((?:%s)/[\w/]+\.py)`" % "|".join(RUNTIME))


def architecture_problems(text: str) -> list[str]:
    """What ``docs/architecture.md`` (its ``text``) gets wrong about the runtime modules: one missing from the
    module tables (a row ``| `path` | what it owns |``), listed twice, or named anywhere on the page but gone."""
    rows = [m.group(1) for m in MODULE_ROW.finditer(text)]
    modules = [str(p.relative_to(REPO)) for p in runtime_modules()]
    problems = [f"{m}: no row in the module tables" for m in modules if m not in rows]
    problems += [f"{m}: listed {rows.count(m)} times" for m in sorted(set(rows)) if rows.count(m) > 1]
    problems += [f"{m}: named, but there is no such module" for m in sorted(set(NAMED_MODULE.findall(text)))
                 if m not in modules]
    return problems


def test_the_architecture_page_names_every_runtime_module_with_what_it_owns():
    problems = architecture_problems(ARCHITECTURE.read_text())
    assert not problems, "docs/architecture.md:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", runtime_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_a_module_missing_from_the_architecture_page_is_caught(path):
    name = str(path.relative_to(REPO))
    text = "\n".join(line for line in ARCHITECTURE.read_text().splitlines() if not line.startswith(f"| `{name}` |"))
    assert f"{name}: no row in the module tables" in architecture_problems(text)
    ghost = "| `shared/gone.py` | nothing |\n"
    assert "shared/gone.py: named, but there is no such module" in architecture_problems(ghost)
