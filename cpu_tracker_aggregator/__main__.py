"""Run the aggregator role against any SyftBox workspace.

    python -m cpu_tracker_aggregator [--config SYFTBOX_CONFIG] [--once]   # poll and publish
    python -m cpu_tracker_aggregator status [--config SYFTBOX_CONFIG]     # the network figure in a terminal
"""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        import argparse

        from cpu_tracker_aggregator.status import status_text
        from shared.host.runner import load_workspace

        args = argparse.ArgumentParser(prog="cpu_tracker_aggregator status")
        args.add_argument("--config")
        ns = args.parse_args(argv[1:])
        print(status_text(load_workspace(ns.config).public_dir()))
        return 0
    from cpu_tracker_aggregator.aggregator import ROLE
    from shared.host.worker import main as run_main

    return run_main(argv, roles=[ROLE], prog="cpu_tracker_aggregator", forced_role="aggregator")


if __name__ == "__main__":
    sys.exit(main())
