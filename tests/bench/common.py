"""Shared helpers of the benchmarks: result rows, the machine, measuring a (sub)process, the report.

A benchmark module exposes ``run(ctx) -> Result``; each of its figures is a ``Row`` with the baseline it is
judged against, measured in the same run. Ratios are always figure / baseline.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


@dataclass
class Context:
    quick: bool
    work: Path  # scratch folder for this run (trees, workspaces, networks)
    log: Callable[[str], None]


@dataclass
class Row:
    figure: str  # what was measured, e.g. "RMSE at k = 100, idle"
    value: float | None
    unit: str
    baseline: str = ""  # what it is compared with
    baseline_value: float | None = None
    goal: str = ""  # in words, e.g. "<= 0.25 x baseline (4x lower)"
    met: bool | None = None  # None: no goal for this row (context only)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline_value:
            return None
        return self.value / self.baseline_value


@dataclass
class Result:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how it was measured, what a miss means
    tables: list[str] = field(default_factory=list)  # extra Markdown (secondary figures)
    details: dict = field(default_factory=dict)  # raw figures for report.json
    seconds: float = 0.0
    error: str = ""


# ---------------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        ram_gb = round(kb / 1024 / 1024, 1)
    except (OSError, StopIteration, ValueError):
        pass
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": ram_gb,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "commit": f"{commit}{' (with uncommitted changes)' if dirty else ''}",
    }


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages (this machine is shared: other work shows here)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def speed_reference(additions: int = 10_000_000) -> float:
    """CPU seconds of a fixed pure-Python loop, per 10^7 additions (``additions`` of them run): how fast this machine
    runs Python right now. Its speed moves by tens of per cent from hour to hour (a shared host), so two runs'
    absolute times compare only beside this figure."""
    started, total = time.process_time(), 0
    for i in range(additions):
        total += i
    return (time.process_time() - started) * 10_000_000 / additions


def remove_later(path: Path) -> None:
    """Delete a large folder in the background (100,000-member trees take a minute to delete)."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    path.rename(trash)
    subprocess.Popen(["rm", "-rf", str(trash)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# ---------------------------------------------------------------------------------------------------
# Measuring processes
# ---------------------------------------------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int, children: bool = False) -> float | None:
    """User + system CPU seconds of a live process (/proc/<pid>/stat, resolution 1 / CLK_TCK); ``children``: plus
    those of its children that exited and that it waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    used = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return (used + (int(fields[13]) + int(fields[14]) if children else 0)) / CLK_TCK  # cutime, cstime


def proc_mem_mb(pid: int | str = "self") -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of a process, in MB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), so the next peak is the next step's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class ChildRun:
    """A finished child process and the JSON object on the last line of its output."""

    out: dict
    wall_s: float
    stderr: str


def run_child(argv: list[str], *, env: dict | None = None, cwd: Path | None = None, timeout: float = 600) -> ChildRun:
    """Run ``argv`` to completion; it must exit 0 and print its figures as JSON on its last line."""
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, env=env, cwd=cwd, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{' '.join(map(str, argv[:6]))} timed out after {timeout} s") from e
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv[:6]))} exited {done.returncode}: {done.stderr[-3000:]}")
    out: dict = {}
    for line in reversed(done.stdout.strip().splitlines()):
        try:
            out = json.loads(line)
            break
        except ValueError:
            continue
    return ChildRun(out, time.perf_counter() - started, done.stderr)


def spawn_accounted(argv: list[str], *, env: dict | None = None, cwd: Path | None = None) -> tuple[int, float, float]:
    """Run ``argv`` to completion; return (exit code, CPU seconds, peak RSS in MB) from ``os.wait4``."""
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen(argv, stdout=null, stderr=null, env=env, cwd=cwd)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------
def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and x != x:
        return "n/a"
    a = abs(x)
    if a == 0:
        s = "0"
    elif a >= 1000:
        s = f"{x:,.0f}"
    elif a >= 100:
        s = f"{x:.0f}"
    elif a >= 10:
        s = f"{x:.1f}"
    elif a >= 1:
        s = f"{x:.2f}"
    elif a >= 0.01:
        s = f"{x:.3f}"
    else:
        s = f"{x:.2g}"
    return f"{s} {unit}".strip()


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return ""
    if r > 0 and r < 0.5:
        return f"{r:.3g} ({1 / r:.3g}x lower)"
    return f"{r:.3g}"


def markdown(meta: dict, results: list[Result]) -> str:
    m = meta["machine"]
    rows_all = [r for res in results for r in res.rows if r.met is not None]
    met = sum(r.met for r in rows_all)
    lines = [
        "# cpu_tracker benchmarks",
        "",
        f"- date: {m['date']}; `{meta['command']}` ({'quick' if meta['quick'] else 'full'} mode), total time "
        f"{meta['seconds']:.0f} s",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, Python {m['python']}, {m['os']}",
        f"- load average (1, 5, 15 min) at the start {meta['load_start']}, at the end {meta['load_end']}: the "
        "machine is shared, and other work running at the same time slows some figures",
        f"- machine speed (a fixed pure-Python loop of 10^7 additions, CPU time; lower is faster): "
        f"{meta.get('speed_start', float('nan')):.2f} s at the start, {meta.get('speed_end', float('nan')):.2f} s at "
        "the end. Absolute times of two runs compare only beside it",
        f"- code: commit {m['commit']}",
        f"- goals met: **{met} of {len(rows_all)}**",
        "",
        "Ratio = figure / baseline, both measured in this run.",
    ]
    for res in results:
        lines += ["", f"## {res.title}", ""]
        if res.error:
            lines += [f"**Failed**: {res.error}", ""]
        if res.rows:
            lines += ["| figure | value | baseline | baseline value | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
            for r in res.rows:
                verdict = "" if r.met is None else ("met" if r.met else "**missed**")
                lines.append(
                    f"| {r.figure} | {fmt(r.value, r.unit)} | {r.baseline} | {fmt(r.baseline_value, r.unit) if r.baseline else ''} "
                    f"| {fmt_ratio(r.ratio) if r.baseline else ''} | {r.goal} | {verdict}{(' ' + r.note) if r.note else ''} |"
                )
        for table in res.tables:
            lines += ["", table]
        if res.notes:
            lines += [""] + [f"- {n}" for n in res.notes]
        lines += ["", f"_{res.name}: {res.seconds:.0f} s_"]
    return "\n".join(lines) + "\n"


def write_report(out: Path, meta: dict, results: list[Result]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(meta, results)
    (out / "report.md").write_text(text)
    data = {
        **meta,
        "benchmarks": [
            {
                "name": res.name,
                "title": res.title,
                "seconds": round(res.seconds, 1),
                "error": res.error or None,
                "rows": [{**asdict(r), "ratio": r.ratio} for r in res.rows],
                "notes": res.notes,
                "tables": res.tables,
                "details": res.details,
            }
            for res in results
        ],
    }
    (out / "report.json").write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return text


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)
