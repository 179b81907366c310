"""The tutorial's member, re-implemented: one run = one fresh Python process (SyftBox starts it every 20 s).

    python -m tests.bench.tutorial_app --config CONFIG --aggregator EMAIL

It does what the tutorial's ``main.py`` does on each run: imports syftbox's Client and diffprivlib, loads the
client config, (re)creates its two folders with their permission files, takes 50 CPU samples 0.1 s apart
(``psutil.cpu_percent()``: the first reading of a fresh process is a meaningless 0.0), publishes
``diffprivlib.tools.mean(samples, epsilon=0.5, bounds=(0, 100))`` rounded to 2 decimals and keeps the raw mean,
each as ``{"cpu", "timestamp"}`` JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from statistics import mean


def samples(n: int = 50, period: float = 0.1) -> list[float]:
    import psutil

    values = []
    while len(values) < n:
        values.append(psutil.cpu_percent())
        time.sleep(period)
    return values


def save(path, cpu: float) -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(json.dumps({"cpu": cpu, "timestamp": stamp}, indent=4))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--aggregator", required=True)
    args = p.parse_args()

    import diffprivlib.tools as dp
    from syftbox.lib import Client, SyftPermission

    client = Client.load(args.config)
    public = client.app_data("cpu_tracker")
    private = client.my_datasite / "private" / "cpu_tracker"  # where the tutorial keeps it
    for folder, readers in ((public, [args.aggregator]), (private, [])):
        folder.mkdir(parents=True, exist_ok=True)
        perm = SyftPermission.datasite_default(client, folder)
        for reader in readers:
            perm.add_rule(path="**", user=reader, permission=["read"])
        perm.save(folder)
    values = samples()
    noisy = round(float(dp.mean(values, epsilon=0.5, bounds=(0, 100))), 2)
    save(public / "cpu_tracker.json", noisy)
    save(private / "cpu_tracker.json", mean(values))


if __name__ == "__main__":
    main()
