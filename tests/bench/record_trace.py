"""Record a real CPU trace on this machine for the accuracy benchmark.

    python -m tests.bench.record_trace [--seconds 600] [--period 0.1] [--out tests/bench/data/cpu_trace_real.csv]

One line per sample period: the whole machine's CPU utilisation (percent, all cores) during that period, as
``psutil.cpu_percent()`` reports it when called once per period (the first, meaningless reading is
discarded). Samples are taken on a fixed schedule (no drift); a late wake-up is recorded as what it is, the
utilisation since the previous reading. Header lines starting with ``#`` say when, where and how.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

DATA = Path(__file__).parent / "data"
DEFAULT = DATA / "cpu_trace_real.csv"


def record(seconds: float, period: float) -> list[float]:
    import psutil

    psutil.cpu_percent()  # primes the counter; its reading is meaningless
    values = []
    start = time.monotonic()
    for i in range(1, round(seconds / period) + 1):
        time.sleep(max(0.0, start + i * period - time.monotonic()))
        values.append(psutil.cpu_percent())
    return values


def load(path: Path = DEFAULT) -> tuple[list[float], dict[str, str]]:
    """The samples of a recorded trace and its header fields."""
    values, header = [], {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            header[key.strip()] = value.strip()
        elif line.strip():
            values.append(float(line))
    return values, header


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.record_trace", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--period", type=float, default=0.1)
    p.add_argument("--note", default="", help="what the machine was doing")
    p.add_argument("--out", type=Path, default=DEFAULT)
    args = p.parse_args()
    from tests.bench.common import machine

    m = machine()
    values = record(args.seconds, args.period)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = [
        f"# recorded: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"# machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {platform.system()}",
        f"# period_s: {args.period}",
        "# value: whole-machine CPU utilisation in percent over each period (psutil.cpu_percent)",
        f"# activity: {args.note}",
    ]
    args.out.write_text("\n".join(header + [f"{v:.1f}" for v in values]) + "\n")
    print(f"wrote {len(values)} samples to {args.out} (mean {sum(values) / len(values):.2f} %)")


if __name__ == "__main__":
    main()
