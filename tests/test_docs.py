"""The documentation stays true to the code: links that lead somewhere, the folder tree in ``shared/paths.py`` that
holds every path ``Paths`` builds, and a settings reference that lists every setting.

Pure text checks, no I/O beyond reading the repository's own files.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from shared import paths as paths_module
from shared.paths import Paths
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page (fenced blocks left out)."""
    headings = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` that lead to no file, or to no heading of the file they name."""
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        name, _, anchor = target.partition("#")
        dest = (page.parent / name).resolve() if name else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            broken.append(f"{target}: no such heading in {dest.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_leads_somewhere(page):
    assert not broken_links(page), f"{page.relative_to(REPO)}: {broken_links(page)}"


def test_a_broken_link_is_caught(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# The member's cap (`x.py`)\n```sh\n# not a heading\n```\n")
    page.write_text("[a](other.md#the-members-cap-xpy) [b](gone.md) [c](other.md#not-a-heading) [d](https://x.org)")
    assert [b.split(":")[0] for b in broken_links(page)] == ["gone.md", "other.md#not-a-heading"]


def drawn_paths(doc: str) -> set[str]:
    """Every path in the ``txt`` tree of a docstring, with every folder above it: ``<data_dir>/private/...``."""
    tree = doc.split("```txt\n", 1)[1].split("```", 1)[0]
    found, stack = set(), []
    for i, line in enumerate(tree.splitlines()):
        m = re.match(r"^((?:│   |    )*)([├└]── )?(\S.*?)(?:\s{2,}.*)?$", line)
        if i and not m.group(2):
            continue  # a comment's second line
        depth = len(m.group(1)) // 4 + (1 if m.group(2) else 0)
        del stack[depth:]
        names = [n.strip().rstrip("/") for n in m.group(3).split(", ")]
        for name in names:
            full = "/".join([*stack, name])
            parts = full.split("/")
            found |= {"/".join(parts[: i + 1]) for i in range(len(parts))}
        stack.append(names[0])
    return found


def built_paths() -> dict[str, str]:
    """Every path ``Paths`` builds, relative to ``<data_dir>``, with placeholders for the member, aggregator and
    round, by the attribute that builds it."""
    p = Paths(Path("<data_dir>"), "<aggregator>")
    args = {"member": "<member>", "aggregator": "<aggregator>", "round_": "<r>", "number": "<n>", "email": "<member>"}
    built = {}
    for name, attr in vars(Paths).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, property):
            value = getattr(p, name)
        elif inspect.isfunction(attr):
            value = attr(p, **{k: args[k] for k in inspect.signature(attr).parameters if k != "self"})
        else:
            continue
        if str(value).startswith("<data_dir>/"):  # outside it (the identity keys): said in the docstring's prose
            built[name] = str(value)
    return built


def test_the_tree_in_paths_holds_every_path_paths_builds():
    drawn = drawn_paths(paths_module.__doc__)
    missing = {name: path for name, path in built_paths().items() if path not in drawn}
    assert not missing, f"shared/paths.py's tree lacks {missing}"


def test_a_path_missing_from_the_tree_is_caught():
    doc = "\n".join(line for line in paths_module.__doc__.splitlines() if "inbox.json" not in line)
    drawn = drawn_paths(doc)
    assert "<data_dir>/datasites/<aggregator>/app_data/cpu_tracker_inbox/<member>/inbox.json" not in drawn
    assert "<data_dir>/datasites/<aggregator>/app_data/cpu_tracker_epoch/epoch.json" in drawn


def test_the_settings_reference_lists_every_setting():
    text = (REPO / "docs" / "operations.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)` \|", text, re.MULTILINE))
    assert not set(Settings.model_fields) - listed, f"docs/operations.md lacks {set(Settings.model_fields) - listed}"
