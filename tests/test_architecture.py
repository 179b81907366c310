"""The shape of the code, checked: imports point one way, and runtime modules hold no code only tests call.

- ``shared`` imports neither app; neither app imports the other; no runtime module imports ``tests``.
- Every top-level function, class and UPPER_CASE constant of a runtime module is used by runtime code (another module,
  the same module, or an entry point), not only by tests.
- So is every method, property and class-level constant of a runtime class (by name; an explicit list names what
  frameworks call).
- ``docs/architecture.md`` names every runtime module, in a row of its module tables with what it owns, and no module
  that is gone.
- Inside ``shared``, imports point down its layers (``SHARED_LAYERS``) and no two modules import each other, directly or
  through others (lazy imports included), but the entry point's hand-over (``HAND_OVER``).
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


# shared's layers, lowest first. A unit (a subpackage, or a top-level module) imports only itself and lower layers;
# the base's modules, standard library only (the supervisor imports them), import each other.
SHARED_LAYERS = (
    ("shared", "shared.atomic", "shared.logs", "shared.paths", "shared.permissions"),  # the base: files, names, logs
    ("shared.privacy",),  # the privacy math, the units and budgets, the ledger, the safe zones
    ("shared.secure", "shared.settings"),  # secure mode's primitives over the math; the settings over the math
    ("shared.wire",),  # the files other datasites read, built from the math's values and secure mode's specs
    ("shared.host",),  # the process: the supervisor on the base, the worker reading the settings
)
# The one cycle: ``python -m shared.host.runner`` hands over to the supervisor or the worker (lazily), which both use
# the runner's client config, lock and command line.
HAND_OVER = {("shared.host.runner", "shared.host.supervisor"), ("shared.host.runner", "shared.host.worker")}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def shared_unit(name: str) -> str:
    """The unit of a module of ``shared``: its subpackage, or itself at the top level."""
    parts = name.split(".")
    return ".".join(parts[:2])


def shared_graph() -> dict[str, set[str]]:
    """Module -> the modules of ``shared`` it imports (``from shared.x import y`` counts ``shared.x.y`` when that is
    a module), for every module of ``shared``."""
    modules = {module_name(p): p for p in runtime_modules() if p.relative_to(REPO).parts[0] == "shared"}
    graph = {}
    for name, path in modules.items():
        tree, out = ast.parse(path.read_text()), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                        for a in node.names}
        out |= imported(tree)
        graph[name] = {m for m in out if m in modules and m != name}
    return graph


def layer_problems(graph: dict[str, set[str]]) -> list[str]:
    """Imports of ``graph`` that point up or across ``SHARED_LAYERS``, and its import cycles (but ``HAND_OVER``)."""
    rank = {unit: i for i, layer in enumerate(SHARED_LAYERS) for unit in layer}
    problems = []
    for name, targets in sorted(graph.items()):
        here = shared_unit(name)
        if here not in rank:
            problems.append(f"{name}: its unit {here} is in no layer of SHARED_LAYERS")
            continue
        for t in sorted(targets):
            there = shared_unit(t)
            if there != here and rank.get(there, len(SHARED_LAYERS)) >= rank[here] and rank[here] > 0:
                problems.append(f"{name} imports {t}: {there} is not below {here}")
    edges = {(a, b) for a, ts in graph.items() for b in ts} - HAND_OVER
    reach = {a: {b for x, b in edges if x == a} for a in graph}
    changed = True
    while changed:  # transitive closure: a few dozen modules
        changed = False
        for a in reach:
            more = set().union(*(reach.get(b, set()) for b in reach[a])) - reach[a]
            if more:
                reach[a] |= more
                changed = True
    problems += [f"{a} imports itself through {sorted(b for b in reach[a] if a in reach.get(b, ()))}"
                 for a in sorted(reach) if a in reach[a]]
    return problems


def test_shared_imports_point_down_its_layers_without_cycles():
    problems = layer_problems(shared_graph())
    assert not problems, "\n".join(problems)


def test_an_import_up_the_layers_or_a_cycle_is_caught():
    graph = shared_graph()
    up = {**graph, "shared.privacy.ledger": graph["shared.privacy.ledger"] | {"shared.settings"}}
    assert ("shared.privacy.ledger imports shared.settings: shared.settings is not below shared.privacy"
            in layer_problems(up))
    circle = {**graph, "shared.wire.schema": graph["shared.wire.schema"] | {"shared.wire.secure_schema"}}  # main's
    assert any(p.startswith("shared.wire.schema imports itself through") for p in layer_problems(circle))


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
            if isinstance(getattr(node, "ctx", None), ast.Store):
                name = None  # assigning a name is not using it
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
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) and node.value is not None else []
            for t in targets:  # module constants (UPPER_CASE names)
                if isinstance(t, ast.Name) and t.id.isupper() and t.id != "__all__" and not used.get(t.id):
                    unused.append(f"{path.relative_to(REPO)}: {t.id} (constant)")
    assert not unused, "defined in runtime code but used only by tests (or nowhere):\n" + "\n".join(unused)


# Methods that a framework or the language calls by name, never our code: what they are called by.
CALLED_BY_FRAMEWORKS = {
    "collect": "prometheus_client's registry, on every scrape (a custom collector's protocol)",
    "describe": "prometheus_client's registry, when a custom collector is registered",
    "emit": "logging, for each record a Handler receives",
    "do_GET": "http.server, for each GET request",
    "do_HEAD": "http.server, for each HEAD request",
    "log_message": "http.server, for each request it would log to stderr",
}
# Where the public figure lives, for whoever reads it like another app: the demo (./run.sh demo) and the tests that
# read the public folder. The publisher writes the same files by their names in paths.py (CURRENT_FILE,
# DASHBOARD_FILE) inside its folder, so no runtime code calls these two (issue 20: kept, and said here).
FOR_READERS = {"current_file", "dashboard_file"}
# Decorators whose functions pydantic (or the class machinery) calls itself.
FRAMEWORK_DECORATORS = {"field_validator", "model_validator", "field_serializer", "model_serializer",
                        "computed_field", "model_post_init"}


def _decorator_names(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    out = set()
    for d in node.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        out.add(d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", ""))
    return out


def class_members(cls: ast.ClassDef) -> list[tuple[str, str]]:
    """(kind, name) of what a class defines that code calls by name: its methods and properties (but dunders and
    what frameworks call), and its class-level constants (plain assignments, or annotated ``ClassVar``s and
    UPPER_CASE names; annotated fields are data that pydantic or dataclasses read and write)."""
    out = []
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = node.name
            if name.startswith("__") and name.endswith("__"):
                continue  # the language calls them
            if name in CALLED_BY_FRAMEWORKS or _decorator_names(node) & FRAMEWORK_DECORATORS:
                continue
            kind = "property" if _decorator_names(node) & {"property", "cached_property"} else "method"
            out.append((kind, name))
        elif isinstance(node, ast.Assign):
            call = node.value.func if isinstance(node.value, ast.Call) else None
            while isinstance(call, ast.Call):  # field_validator("x")(function): a validator bound by assignment
                call = call.func
            if getattr(call, "id", getattr(call, "attr", None)) in FRAMEWORK_DECORATORS:
                continue
            out += [("constant", t.id) for t in node.targets if isinstance(t, ast.Name) and t.id != "model_config"
                    and not t.id.startswith("__")]  # __slots__ and the like: the language reads them
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            annotation = ast.unparse(node.annotation)
            if "ClassVar" in annotation or node.target.id.isupper():
                out.append(("constant", node.target.id))
        elif isinstance(node, ast.ClassDef):
            out += class_members(node)
    return out


def test_runtime_classes_hold_no_method_property_or_constant_only_tests_use():
    """Every method, property and class-level constant of a runtime class is used by name somewhere in runtime code
    (a call, an attribute, a reference). Names are matched by name alone: one used anywhere covers every class's
    member of that name, so this errs towards passing."""
    trees = {p: ast.parse(p.read_text()) for p in runtime_modules()}
    used: dict[str, int] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name and not isinstance(getattr(node, "ctx", None), ast.Store):  # assigning a name is not using it
                used[name] = used.get(name, 0) + 1
    unused = []
    for path, tree in trees.items():
        rel = str(path.relative_to(REPO))
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for kind, name in class_members(cls):
                if not used.get(name) and name not in FOR_READERS:
                    unused.append(f"{rel}: {cls.name}.{name} ({kind})")
    assert not unused, "defined in runtime classes but used only by tests (or nowhere):\n" + "\n".join(sorted(set(unused)))


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
