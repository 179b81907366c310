"""``./run.sh demo``: a whole SyftBox network on this machine, with the app installed as a user would.

    ./run.sh demo [--members 3] [--interval 20] [--duration SECONDS] [--root DIR] [--mode local|secure]

Starts a real SyftBox relay server and one client per datasite on 127.0.0.1 (3 members and 1 aggregator
by default, in a temporary folder), copies the app into each client's apps/ folder with a settings file,
lets SyftBox's scheduler start it, prints the network figure as it arrives, serves the aggregator's public
folder (the live page) on 127.0.0.1, and stops everything on Ctrl-C or after ``--duration``.

``--mode secure`` (5 members by default) runs secure aggregation instead: the aggregator learns only each round's
noisy sum. It protects one second of each member's activity at epsilon 5 (the unit and epsilon of local mode): at 5
members and 8 s windows that is a 95 % interval of about +-2.4 points (standard error 1.1; local noise: 1.6); a
member's whole window at epsilon 1 would mean about +-60 points at this cohort size (see the README's table).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.localnet.network import LocalNetwork, free_port
from shared.paths import Paths

REPO = Path(__file__).resolve().parents[2]
AGG = "aggregator@demo.example.org"


def install_tracker(net: LocalNetwork, members: list[str], aggregator: str, settings: str) -> None:
    """Install this app into every client as a user would: a copy with ``settings`` as its cpu_tracker.toml;
    the aggregator's copy also says ``role = "aggregator"`` (it publishes no report of its own)."""
    net.install_app(REPO, symlink=False, emails=members, files={"cpu_tracker.toml": settings})
    net.install_app(REPO, symlink=False, emails=[aggregator],
                    files={"cpu_tracker.toml": settings + 'role = "aggregator"\n'})


def site_paths(net: LocalNetwork, email: str) -> Paths:
    """The app's paths in ``email``'s client of ``net``."""
    return Paths(data_dir=net.sites[email].data_dir, email=email)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(folder: Path) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``folder`` on 127.0.0.1 in a daemon thread; returns the server and its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_port}/"


def secure_settings(aggregator: str, interval: float) -> str:
    """The demo's secure-mode settings: local mode's unit and epsilon, a tick short enough for the round deadlines."""
    return (f'aggregator = "{aggregator}"\nmode = "secure"\nsecure_unit = "cpu_second"\nsecure_epsilon = 5.0\n'
            f"interval_s = {interval}\ntick_s = {min(2.0, interval / 8)}\n")


def figure_line(dash: dict) -> str:
    sec = dash.get("secure")
    if sec:
        p = sec.get("percentiles", {})
        vague = set(sec.get("cohort_too_small_for", []))  # as the page: no number where the interval spans it all
        pct = "  ".join(f"{k} cohort too small for it" if k in vague else
                        f"{k} {v['estimate']:.0f} [{v['low']:.0f}, {v['high']:.0f}]" for k, v in p.items())
        return (f"{dash['generated_at'][11:19]}  secure round {sec['round']}: network CPU {sec['mean']:6.2f} %  95 % "
                f"interval [{sec['ci95_low']:6.2f}, {sec['ci95_high']:6.2f}]  {sec['survivors']} of {sec['cohort']} "
                f"members  {pct}  (epsilon {sec['epsilon']:.3g} per {sec['unit_words']})")
    c = dash["counts"]
    counts = f"fresh {c['fresh']}, stale {c['stale']}, rejected {c['rejected']}"
    e = dash.get("estimate")
    if not e:
        return f"{dash['generated_at'][11:19]}  no figure yet ({counts}): {dash['message']}"
    return (f"{dash['generated_at'][11:19]}  network CPU {e['mean']:6.2f} %  95 % interval "
            f"[{e['ci95_low']:6.2f}, {e['ci95_high']:6.2f}]  ({counts})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./run.sh demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=None, help="member datasites (default 3; 5 with --mode secure)")
    p.add_argument("--mode", choices=("local", "secure"), default="local",
                   help="local: Laplace-noised reports; secure: secure aggregation with distributed noise")
    p.add_argument("--interval", type=float, default=20.0, help="release interval in seconds (default 20)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    p.add_argument("--root", type=Path, default=None, help="folder for everything (default: a temporary one)")
    args = p.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="cpu_tracker_demo_"))
    count = args.members or (5 if args.mode == "secure" else 3)
    members = [f"member{i}@demo.example.org" for i in range(1, count + 1)]
    settings = f'aggregator = "{AGG}"\ninterval_s = {args.interval}\ntick_s = {min(10.0, args.interval / 2)}\n'
    if args.mode == "secure":
        settings = secure_settings(AGG, args.interval)
        print("demo: secure mode: each round protects one second of a member's activity at epsilon 5 (local mode's "
              "unit and epsilon); the aggregator sees only the cohort's noisy sum")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    print(f"demo: everything lives in {root}")
    net = LocalNetwork(root, Path(sys.prefix) / "bin", [*members, AGG], log=lambda line: print(line.replace("localnet", "demo")))
    httpd = None
    try:
        net.start()
        install_tracker(net, members, AGG, settings)
        agg = site_paths(net, AGG)
        httpd, url = serve(agg.public_dir())
        print(f"demo: relay server {net.server_url}; {len(members)} members publish every {args.interval:g} s")
        print(f"demo: live page   {url}index.html")
        print(f"demo: the figure  {agg.current_file}   (history: {agg.public_dir() / 'history'})")
        print(f"demo: app logs    {net.root}/<datasite>/data/apps/cpu_tracker/logs/   (Ctrl-C stops everything)")
        watch(agg, stop, args.duration)
    finally:
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        net.stop()
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
        print("demo: stopped")
    return 0


def watch(agg: Paths, stop: threading.Event, duration: float | None) -> None:
    """Print a line each time the dashboard changes, until ``stop`` or ``duration``."""
    deadline = time.monotonic() + duration if duration else None
    last = None
    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
        try:
            dash = json.loads(agg.current_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            dash = None
        line = figure_line(dash) if dash else None
        if line and line[8:] != last:  # print when the figure or the counts change, not every tick
            last = line[8:]
            print(line, flush=True)
        stop.wait(1.0)


if __name__ == "__main__":
    sys.exit(main())
