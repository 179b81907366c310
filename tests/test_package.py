"""The project installs: ``pip wheel .`` builds a wheel holding the runtime only, and both roles run from a fresh
venv where that wheel is installed (not from this checkout)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ("cpu_tracker_member", "cpu_tracker_aggregator", "shared")


def _run(argv: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (so no build/ or egg-info lands in it)."""
    src = tmp_path_factory.mktemp("src") / "cpu_tracker"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "logs", "*.pyc", "bench-*"))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, src], cwd=src)
    (found,) = out.glob("*.whl")
    return found


def test_the_wheel_holds_the_runtime_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == set(RUNTIME_PACKAGES)
    # every module and committed JSON Schema of the runtime packages, subpackages included
    files = {str(p.relative_to(REPO)) for pkg in RUNTIME_PACKAGES for p in (REPO / pkg).rglob("*")
             if p.suffix in (".py", ".json") and "__pycache__" not in p.parts}
    assert "shared/wire/schemas/member_report.schema.json" in files and "shared/privacy/ledger.py" in files
    assert sorted(files - set(names)) == []
    assert "cpu_tracker_aggregator/page/index.html" in names
    assert not [n for n in names if n.startswith("tests/") or "localnet" in n]


def test_the_wheel_declares_the_runtime_pins(wheel):
    meta = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA"))
    msg = Parser().parsestr(zipfile.ZipFile(wheel).read(meta).decode())
    requires = [r for r in msg.get_all("Requires-Dist") if "extra ==" not in r]
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(map(_requirement, requires)) == sorted(_requirement(d) for d in declared)


def _requirement(text: str) -> tuple[str, tuple[str, ...]]:
    """(name, sorted specifiers) of a requirement line: the same pin however it is spelled."""
    text = text.split("#")[0].split(";")[0].replace(" ", "").lower()
    name = re.match(r"[a-z0-9_.\-]+", text).group(0)
    return name, tuple(sorted(filter(None, text[len(name):].split(","))))


def test_both_roles_run_from_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    site = Path(_run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=tmp_path).stdout.strip())
    # the wheel's files go in with pip (no dependencies: those already lie in this test environment, which the
    # venv then sees through a .pth file, the way a site-packages directory is added)
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", site, wheel], cwd=tmp_path)
    (site / "zz_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}  # no PYTHONPATH: not this checkout
    for role in ("member", "aggregator"):
        done = _run([venv / "bin" / "python", "-m", f"cpu_tracker_{role}", "--help"], cwd=tmp_path, env=env)
        assert "--config" in done.stdout and "--once" in done.stdout
    where = _run([venv / "bin" / "python", "-c", "import shared.host.runner, cpu_tracker_aggregator.aggregator as a; "
                  "print(shared.host.runner.__file__); print(a.PAGE.is_file())"], cwd=tmp_path, env=env).stdout.split()
    assert Path(where[0]).is_relative_to(site) and where[1] == "True"
    assert not os.path.commonpath([where[0], str(REPO)]) == str(REPO)
