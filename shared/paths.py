"""Every path the app reads or writes, in one place, so member and aggregator never drift apart.

```txt
<data_dir>/
├── private/cpu_tracker/                     <-- never synced: outside datasites/
│   ├── app.lock                             one running instance per datasite
│   ├── member/ledger.jsonl                  privacy ledger (every release, append-only)
│   ├── member/raw.jsonl                     raw window means, for the owner's eyes only
│   ├── aggregator/history.json              network history (survives restarts)
│   ├── aggregator/members.json              per-member status, for the operator only
│   ├── member/monitors.json                 private alerts: the member's references and noisy radii
│   ├── aggregator/alerts.json               private alerts: the coordinator's state and the noisy vectors
│   └── aggregator/cpu_tracker.prom          the public figures for Prometheus (textfile collector)
└── datasites/
    ├── <member>/app_data/cpu_tracker/
    │   ├── cpu_tracker.json                 the DP report (MemberReport)
    │   ├── monitor.json                     private alerts: breach flags, noisy vectors (MonitorSignalsFile)
    │   ├── syftperm.yaml, syft.pub.yaml     owner: all; the aggregator: read; nobody else
    │   ├── secure_join.json, secure/r<round>.json, secure/answers.json   secure mode (shared.secure_schema)
    ├── <member>/public/did.json             every datasite's identity keys (syft-crypto's did:web document)
    ├── <member>/api_data/cpu_tracker/cpu_tracker.json   a tutorial-era member's report (read as legacy)
    ├── <aggregator>/app_data/cpu_tracker_epoch/epoch.json, rounds.json   secure mode: the cohort only
    ├── <aggregator>/app_data/cpu_tracker_inbox/<member>/inbox.json      secure mode: that member only
    ├── <aggregator>/app_data/cpu_tracker_alerts/<member>/zones.json   the member's safe zones (SafeZonesFile),
    │                                        with permission files: the aggregator and that member only
    └── <aggregator>/public/cpu_tracker/            world-readable (cpu_tracker_aggregator/publish.py)
        ├── monitors.json                    the monitors and their rounds (MonitorsFile)
        ├── current.json                     the figure now (Current): rewritten only when something changed
        ├── history/index.json, history/recent-*.json, history/coarse-*.json   history segments (Segment)
        ├── dashboard.json                   schema-1 Dashboard with the whole history, for old readers
        ├── *.schema.json, index.html
        └── syftperm.yaml, syft.pub.yaml     world-readable
```
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from shared import APP_NAME

REPORT_FILE = "cpu_tracker.json"
MONITOR_SIGNALS_FILE = "monitor.json"
MONITORS_FILE = "monitors.json"
ZONES_FILE = "zones.json"
DASHBOARD_FILE = "dashboard.json"
CURRENT_FILE = "current.json"
HISTORY_DIR = "history"
HISTORY_INDEX_FILE = f"{HISTORY_DIR}/index.json"
DASHBOARD_SCHEMA_FILE = "dashboard.schema.json"
REPORT_SCHEMA_FILE = "member_report.schema.json"
PAGE_FILE = "index.html"
SECURE_JOIN_FILE = "secure_join.json"
EPOCH_FILE = "epoch.json"
ROUNDS_FILE = "rounds.json"
INBOX_FILE = "inbox.json"
ANSWERS_FILE = "answers.json"
DID_FILE = "did.json"  # syft-crypto's name and place: datasites/<email>/public/did.json
PRIVATE_KEYS_FILE = "pvt.jwks.json"  # syft-crypto's: <data_dir>/../.syftbox/<8 hex>/pvt.jwks.json
SYFTPERM_FILE = "syftperm.yaml"
SYFT_PUB_FILE = "syft.pub.yaml"
_EMAIL = re.compile(r"[^@/\\\s*?\[\]]+@[^@/\\\s*?\[\]]+")  # no separator, whitespace or glob character


def is_datasite_email(name: str) -> bool:
    """The one rule for a datasite's name (a member folder, the ``aggregator`` setting): one ``@``, printable UTF-8,
    no path separator, whitespace or glob character (``*?[]``: the newer server reads those as patterns)."""
    if not (_EMAIL.fullmatch(name) and name.isprintable()):
        return False
    try:
        name.encode("utf-8")  # a folder name that is not UTF-8 on disk arrives with surrogate escapes
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Paths:
    """Paths of one datasite's workspace. Pure: building it touches no file."""

    data_dir: Path
    email: str
    app_name: str = APP_NAME
    server_url: str = ""  # the SyftBox client's server URL: it names the private-key folder (syft-crypto's layout)

    @property
    def datasites(self) -> Path:
        return self.data_dir / "datasites"

    @property
    def my_datasite(self) -> Path:
        return self.datasites / self.email

    # -- private, never synced ------------------------------------------------------------------
    @property
    def private(self) -> Path:
        return self.data_dir / "private" / self.app_name

    @property
    def lock_file(self) -> Path:
        return self.private / "app.lock"

    @property
    def ledger_file(self) -> Path:
        return self.private / "member" / "ledger.jsonl"

    @property
    def raw_file(self) -> Path:
        return self.private / "member" / "raw.jsonl"

    @property
    def history_file(self) -> Path:
        return self.private / "aggregator" / "history.json"

    @property
    def members_status_file(self) -> Path:
        return self.private / "aggregator" / "members.json"

    @property
    def metrics_file(self) -> Path:
        """The Prometheus textfile (for node_exporter's textfile collector): local, never synced."""
        return self.private / "aggregator" / "cpu_tracker.prom"

    # -- synced ---------------------------------------------------------------------------------
    def report_dir(self, member: str | None = None) -> Path:
        """The member's report folder (``member`` defaults to this datasite)."""
        return self.datasites / (member or self.email) / "app_data" / self.app_name

    def report_file(self, member: str | None = None) -> Path:
        return self.report_dir(member) / REPORT_FILE

    def legacy_report_file(self, member: str | None = None) -> Path:
        """Where the tutorial-era member wrote its report (``api_data/``; read as legacy by the aggregator)."""
        return self.datasites / (member or self.email) / "api_data" / self.app_name / REPORT_FILE

    def public_dir(self, aggregator: str | None = None) -> Path:
        return self.datasites / (aggregator or self.email) / "public" / self.app_name

    @property
    def dashboard_file(self) -> Path:
        return self.public_dir() / DASHBOARD_FILE

    @property
    def current_file(self) -> Path:
        return self.public_dir() / CURRENT_FILE

    # -- secure aggregation (shared.secure_schema names what each file holds) ---------------------------
    @property
    def secure_private(self) -> Path:
        """The member's secure-mode state (rounds used, views signed, what it revealed) and the pins of other
        datasites' keys: local, never synced."""
        return self.private / "secure"

    @property
    def secure_state_file(self) -> Path:
        return self.secure_private / "state.json"

    @property
    def pins_file(self) -> Path:
        return self.secure_private / "pins.json"

    @property
    def aggregator_secure_file(self) -> Path:
        return self.private / "aggregator" / "secure.json"

    def aggregator_epoch_copy(self, number: int) -> Path:
        """The aggregator's private copy of an epoch it signed, to resume it after a restart."""
        return self.private / "aggregator" / "epochs" / f"{number}.json"

    def did_file(self, email: str | None = None) -> Path:
        """A datasite's identity keys (syft-crypto's did:web document), world-readable by SyftBox's convention."""
        return self.datasites / (email or self.email) / "public" / DID_FILE

    @property
    def private_keys_file(self) -> Path:
        """This datasite's private identity keys where syft-crypto keeps them: outside the SyftBox folder, in
        ``<data_dir>/../.syftbox/<first 8 hex of sha256("<server_url>::<email>")>/`` (so one key per datasite)."""
        partition = hashlib.sha256(f"{self.server_url}::{self.email}".encode()).hexdigest()[:8]
        return self.data_dir.parent / ".syftbox" / partition / PRIVATE_KEYS_FILE

    def secure_join_file(self, member: str | None = None) -> Path:
        """A member's request to take part in secure rounds, in its report folder: for the aggregator only (nothing
        public says who takes part)."""
        return self.report_dir(member) / SECURE_JOIN_FILE

    def epoch_dir(self, aggregator: str | None = None) -> Path:
        """The aggregator's epoch folder, readable by the epoch's cohort only."""
        return self.datasites / (aggregator or self.email) / "app_data" / f"{self.app_name}_epoch"

    def epoch_file(self, aggregator: str | None = None) -> Path:
        return self.epoch_dir(aggregator) / EPOCH_FILE

    def rounds_file(self, aggregator: str | None = None) -> Path:
        """The recent rounds' outcomes (no emails), beside the epoch: the cohort only."""
        return self.epoch_dir(aggregator) / ROUNDS_FILE

    def upload_dir(self, member: str | None = None) -> Path:
        """A member's round uploads: inside its report folder, so under the same aggregator-only permission."""
        return self.report_dir(member) / "secure"

    def upload_file(self, round_: int, member: str | None = None) -> Path:
        return self.upload_dir(member) / f"r{round_}.json"

    def answers_file(self, member: str | None = None) -> Path:
        """A member's signed views and sealed reveals of recent rounds, rewritten when it has new ones."""
        return self.upload_dir(member) / ANSWERS_FILE

    def inbox_dir(self, member: str, aggregator: str | None = None) -> Path:
        """The aggregator's folder for one member, readable by that member only (apart from the app's own report
        folder, so that no permission file of one covers the other)."""
        return self.datasites / (aggregator or self.email) / "app_data" / f"{self.app_name}_inbox" / member

    def inbox_file(self, member: str, aggregator: str | None = None) -> Path:
        return self.inbox_dir(member, aggregator) / INBOX_FILE

    # -- private alerts (safe zones) -----------------------------------------------------------
    @property
    def member_monitor_state_file(self) -> Path:
        return self.private / "member" / "monitors.json"

    @property
    def alerts_state_file(self) -> Path:
        return self.private / "aggregator" / "alerts.json"

    def monitor_signals_file(self, member: str | None = None) -> Path:
        """The member's breach flags and noisy vectors, beside its report (the aggregator alone may read them)."""
        return self.report_dir(member) / MONITOR_SIGNALS_FILE

    def monitors_file(self, aggregator: str | None = None) -> Path:
        return self.public_dir(aggregator) / MONITORS_FILE

    def zones_dir(self, member: str, aggregator: str | None = None) -> Path:
        """The aggregator's folder for ``member``'s safe zones, readable by the aggregator and that member only."""
        return self.datasites / (aggregator or self.email) / "app_data" / f"{self.app_name}_alerts" / member

    def zones_file(self, member: str, aggregator: str | None = None) -> Path:
        return self.zones_dir(member, aggregator) / ZONES_FILE
