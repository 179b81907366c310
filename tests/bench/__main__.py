"""``./run.sh bench``: every benchmark, and a report (Markdown and JSON) with each figure next to its baseline.

    ./run.sh bench [--quick] [--out bench-results] [--only NAME ...] [--work DIR]

Benchmarks (one module each): aggregator_scale, accuracy, secure_accuracy, secure_protocol, secure_scale,
secure_latency, member_overhead, relay_bytes, e2e_latency, soak, safezone (private alerts, last: a simulation of
under a minute). secure_scale (the secure aggregator at 1,000, 10,000 and 100,000 members) runs alone.
Each runs in its own process. The aggregator timings run alone; the member overhead (light, measured as the
member's own CPU time) runs beside the accuracy simulation; the secure-aggregation accuracy (about 2 minutes of one
core) beside the secure protocol's costs after them; the secure rounds on a local network after the other network
benchmark; the relay bytes next; the local network next (with --quick: beside
the others, to stay under two minutes); the soak (7 simulated days, 1 with --quick; member and aggregator side by
side) runs last. The full run takes about 17 minutes on a 2-core machine, --quick about 2.5.

Opt-in, never in the default run (``--only`` names them): secure_soak (30 minutes of a real network in secure mode,
its aggregator SIGKILLed and its relay stopped for 120 s; --quick: 5 minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from tests.bench.common import (
    PYTHON,
    REPO,
    Context,
    Result,
    Row,
    child_env,
    load_average,
    machine,
    remove_later,
    speed_reference,
    write_report,
)

BENCHMARKS = ("aggregator_scale", "accuracy", "secure_accuracy", "secure_protocol", "secure_scale", "secure_latency",
              "member_overhead", "relay_bytes", "e2e_latency", "soak", "safezone")
OPT_IN = ("secure_soak",)  # run only when named with --only
PHASES_FULL = (("aggregator_scale",), ("member_overhead", "accuracy"), ("secure_accuracy", "secure_protocol"),
               ("secure_scale",), ("relay_bytes",), ("e2e_latency",), ("secure_latency",), ("soak",), ("safezone",),
               ("secure_soak",))
PHASES_QUICK = (("aggregator_scale",), ("member_overhead", "accuracy", "relay_bytes", "e2e_latency"),
                ("secure_accuracy", "secure_protocol"), ("secure_scale",), ("secure_latency",), ("soak",),
                ("safezone",), ("secure_soak",))


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def run_one(name: str, quick: bool, work: Path) -> Result:
    """Run benchmark ``name`` in this process."""
    import importlib

    started = time.perf_counter()
    module = importlib.import_module(f"tests.bench.{name}")
    try:
        res = module.run(Context(quick=quick, work=work, log=log))
    except Exception as e:  # noqa: BLE001  a failed benchmark is reported, the others still run
        res = Result(name, name, error=f"{type(e).__name__}: {e}")
        log(f"{name} failed:\n{traceback.format_exc()}")
    res.seconds = time.perf_counter() - started
    return res


def spawn(name: str, quick: bool, work: Path) -> tuple[subprocess.Popen, Path]:
    out = work / f"{name}.result.json"
    argv = [PYTHON, "-m", "tests.bench", "--child", name, "--work", str(work / name), "--result", str(out)]
    (work / name).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(argv + (["--quick"] if quick else []), env=child_env(), cwd=REPO), out


def load_result(name: str, path: Path, code: int) -> Result:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return Result(name, name, error=f"the benchmark process exited {code} without a result")
    rows = [Row(**r) for r in data.pop("rows")]
    return Result(**data, rows=rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./run.sh bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller run, under two minutes")
    p.add_argument("--out", type=Path, default=REPO / "bench-results", help="report folder (default bench-results)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS + OPT_IN, help="run only these")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed afterwards)")
    p.add_argument("--child", choices=BENCHMARKS + OPT_IN, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:  # one benchmark, in its own process, result to a file
        res = run_one(args.child, args.quick, args.work)
        args.result.write_text(json.dumps({**asdict(res)}, default=str))
        return 0

    started, load_start, speed_start = time.perf_counter(), load_average(), speed_reference()
    work = args.work or Path(tempfile.mkdtemp(prefix="cpu_tracker_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only or BENCHMARKS)
    results: dict[str, Result] = {}
    try:
        for phase in PHASES_QUICK if args.quick else PHASES_FULL:
            names = [n for n in phase if n in wanted]
            if not names:
                continue
            log(f"running {', '.join(names)}{' (quick)' if args.quick else ''}; load average {load_average()}")
            procs = {n: spawn(n, args.quick, work) for n in names}
            for n, (proc, out) in procs.items():
                code = proc.wait()
                results[n] = load_result(n, out, code)
                log(f"{n} done in {results[n].seconds:.0f} s" + (f": FAILED {results[n].error}" if results[n].error else ""))
    finally:
        if args.work is None:
            remove_later(work)
    meta = {"machine": machine(), "quick": args.quick, "seconds": time.perf_counter() - started,
            "command": "./run.sh bench" + (" --quick" if args.quick else ""), "load_start": load_start,
            "load_end": load_average(), "speed_start": speed_start, "speed_end": speed_reference()}
    text = write_report(args.out, meta, [results[n] for n in BENCHMARKS + OPT_IN if n in results])
    print(text)
    log(f"report written to {args.out / 'report.md'} and {args.out / 'report.json'}")
    return 1 if any(r.error for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
