"""Run the member role against any SyftBox workspace.

    python -m cpu_tracker_member [--config SYFTBOX_CONFIG] [--once]   # sample and publish
    python -m cpu_tracker_member status [--config SYFTBOX_CONFIG]     # ledger, budget, raw vs published
"""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        import argparse

        from cpu_tracker_member.status import status_text
        from shared.host.runner import app_dir, load_workspace
        from shared.wire.schema import utc_now
        from shared.settings import load_settings

        args = argparse.ArgumentParser(prog="cpu_tracker_member status")
        args.add_argument("--config")
        ns = args.parse_args(argv[1:])
        print(status_text(load_workspace(ns.config), load_settings(app_dir()), utc_now()))
        return 0
    from cpu_tracker_member.member import ROLE
    from shared.host.worker import main as run_main

    return run_main(argv, roles=[ROLE], prog="cpu_tracker_member", forced_role="member")


if __name__ == "__main__":
    sys.exit(main())
