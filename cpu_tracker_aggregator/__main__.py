"""Run the aggregator role against any SyftBox workspace.

    python -m cpu_tracker_aggregator [--config SYFTBOX_CONFIG] [--once]   # poll and publish
    python -m cpu_tracker_aggregator status [--config SYFTBOX_CONFIG]     # the network figure in a terminal
"""

import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["status"]:
        import argparse

        from cpu_tracker_aggregator.status import status_text
        from shared.app import load_workspace

        args = argparse.ArgumentParser(prog="cpu_tracker_aggregator status")
        args.add_argument("--config")
        ns = args.parse_args(argv[1:])
        paths = load_workspace(ns.config)
        print(status_text(paths.dashboard_file))
        return 0
    from shared.app import main as app_main

    return app_main(argv, forced_role="aggregator")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
