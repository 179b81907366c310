"""Every path the app reads or writes, in one place, so member and aggregator never drift apart.

```txt
<data_dir>/
├── private/cpu_tracker/                     never synced: outside datasites/
│   ├── app.lock                             one worker per datasite
│   ├── supervisor.lock                      one supervisor per datasite
│   ├── logs/cpu_tracker.log                 the app's own log, only when the app folder is a shared symlink
│   ├── member/
│   │   ├── ledger.jsonl                     privacy ledger: every spend, fsynced before anything is published
│   │   ├── raw.jsonl                        raw window means, for the owner's eyes only
│   │   └── monitors.json                    private alerts: the member's references and noisy radii
│   ├── secure/                              secure mode, the member's
│   │   ├── state.json                       rounds used, views signed, what it revealed: recorded before it leaves
│   │   └── pins.json                        the identity keys of other datasites, pinned at first sight
│   └── aggregator/
│       ├── history.json                     network history (survives restarts)
│       ├── members.json                     per-member status, for the operator only
│       ├── alerts.json                      private alerts: the coordinator's state and the noisy vectors
│       ├── cpu_tracker.prom                 the public figures for Prometheus (textfile collector)
│       ├── secure.json                      secure mode: the open rounds and the epoch, across a restart
│       └── epochs/<n>.json                  secure mode: each epoch it signed, to resume it after a restart
├── plugins/local_syncstate.json             the SyftBox 0.4.0 client's record of what the relay holds (read only)
└── datasites/
    ├── <member>/app_data/cpu_tracker/       the member's: the aggregator may read it, nobody else
    │   ├── cpu_tracker.json                 the DP report (MemberReport), local mode
    │   ├── monitor.json                     private alerts: breach flags, noisy vectors (MonitorSignalsFile)
    │   ├── secure_join.json                 secure mode: its request to take part (SecureJoin)
    │   ├── secure/r<r>.json                 secure mode: its upload for round r (SecureUpload)
    │   ├── secure/answers.json              secure mode: its signed views and sealed reveals (SecureAnswers)
    │   ├── syftperm.yaml                    permission file for the PyPI client (denies everyone, then grants)
    │   └── syft.pub.yaml                    permission file for the Go client (terminal)
    ├── <member>/public/did.json             every datasite's identity keys (syft-crypto's did:web document)
    ├── <member>/api_data/cpu_tracker/cpu_tracker.json   a tutorial-era member's report (read as legacy)
    ├── <aggregator>/app_data/cpu_tracker_epoch/         secure mode, readable by the epoch's cohort only
    │   ├── epoch.json                       the cohort, the graph's seed, the noise, the schedule (Epoch)
    │   └── rounds.json                      each closed round's outcome (RoundOutcomes)
    ├── <aggregator>/app_data/cpu_tracker_inbox/<member>/   secure mode, readable by that member only
    │   └── inbox.json                       its neighbours' statuses and the shares sealed for it (Inbox)
    ├── <aggregator>/app_data/cpu_tracker_alerts/<member>/  private alerts, readable by that member only
    │   └── zones.json                       the member's safe zones (SafeZonesFile)
    └── <aggregator>/public/cpu_tracker/     world-readable (cpu_tracker_aggregator/publish.py)
        ├── current.json                     the figure now (Current): rewritten only when something changed
        ├── history/index.json               the segment files there are (HistoryIndex)
        ├── history/recent-YYYYMMDDTHH.json  the ticks of one UTC hour (Segment): kept 24 h
        ├── history/coarse-YYYYMMDD.json     the 5-minute points of one UTC day (Segment): kept 30 days
        ├── dashboard.json                   schema-1 Dashboard with the whole history, for old readers
        ├── monitors.json                    the monitors and their rounds (MonitorsFile)
        ├── *.schema.json                    the JSON Schemas of the files above (shared/wire/schemas/)
        ├── index.html                       the self-contained page
        └── syftperm.yaml, syft.pub.yaml     world-readable
```

Each ``app_data`` folder of the aggregator carries its own ``syftperm.yaml`` and ``syft.pub.yaml`` too. Outside the
data folder: the datasite's private identity keys where syft-crypto keeps them
(``<data_dir>/../.syftbox/<8 hex>/pvt.jwks.json``, ``Paths.private_keys_file``), the app folder (``apps/cpu_tracker/``: the code, ``cpu_tracker.toml``, SyftBox's app log in
``logs/``) and the shared Python environments, ``~/.cache/cpu_tracker/env-<hash of the pins>/`` with their records
in ``in-use/`` (``shared/host/envs.py``). How often each public file changes and what it costs the relay:
``docs/dashboard.md``; who can read what: ``docs/permissions.md``.
"""

from __future__ import annotations

import re
from collections import namedtuple
from functools import lru_cache
from pathlib import Path

from shared import APP_NAME

SETTINGS_FILE = "cpu_tracker.toml"  # in the app folder (shared.settings reads it, the supervisor watches it)
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
_EMAIL = re.compile(r"[^@/\\\s*?\[\]{}]+@[^@/\\\s*?\[\]{}]+")  # no separator, whitespace or glob character


def email_shape_problem(name: str) -> str | None:
    """The part of ``datasite_email_problem`` that needs no pydantic: one ``@``, printable UTF-8, no path separator,
    whitespace or pattern character. Enough alone only for an email SyftBox itself validated (its client config,
    which the supervisor reads)."""
    if not (_EMAIL.fullmatch(name) and name.isprintable()):
        return "one @, no spaces, slashes or pattern characters (* ? [ ] { })"
    try:
        name.encode("utf-8")  # a folder name that is not UTF-8 on disk arrives with surrogate escapes
    except UnicodeEncodeError:
        return "not valid UTF-8"
    return None


def datasite_email_problem(name: str) -> str | None:
    """Why ``name`` cannot be a datasite's email (None: it can). The one rule for a datasite's name (a member folder,
    the ``aggregator`` setting): an address SyftBox itself accepts as a datasite's email, written as SyftBox writes
    it, with nothing the newer server reads as a pattern.

    - SyftBox's rule: the client's config declares ``email: EmailStr`` (syftbox 0.4.0 ``lib/client_config.py``), so
      a datasite exists only under an address that pydantic's ``validate_email`` (email-validator) accepts, and its
      folder is named by the *normalised* form (the domain lower-cased, IDNA decoded): ``Agg@Example.ORG`` becomes
      the folder ``Agg@example.org``. A name that is not its own normalised form names no datasite.
    - Ours on top: one ``@``, printable UTF-8, no path separator, whitespace or glob character (``* ? [ ] { }``:
      the newer server reads those as patterns, so ``*@example.org``, which EmailStr accepts, would name everyone
      at example.org in a permission file)."""
    if problem := email_shape_problem(name):
        return problem
    from pydantic import validate_email  # here, not above: the supervisor reads paths without pydantic
    from pydantic_core import PydanticCustomError

    try:
        _, normalised = validate_email(name)
    except (PydanticCustomError, ValueError) as e:
        return f"SyftBox refuses it as an email ({str(e).split(': ', 1)[-1].rstrip('.')})"
    if normalised != name:
        return f"SyftBox writes it as {normalised!r}"
    return None


@lru_cache(maxsize=1 << 18)  # the aggregator asks again for every member folder at every tick
def is_datasite_email(name: str) -> bool:
    """``datasite_email_problem(name) is None``: a name that can be a datasite's email."""
    return datasite_email_problem(name) is None


class Paths(namedtuple("Paths", "data_dir email app_name server_url", defaults=(APP_NAME, ""))):
    """Paths of one datasite's workspace (``data_dir``: Path, ``email``: str, ``app_name``, ``server_url``: the SyftBox
    client's server URL, which names the private-key folder in syft-crypto's layout). Pure: building it touches no
    file. Immutable; a named tuple rather than a dataclass, which would cost the supervisor 1.2 MB."""

    __slots__ = ()

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
    def supervisor_lock_file(self) -> Path:
        return self.private / "supervisor.lock"

    @property
    def log_file(self) -> Path:
        """The app's own log, used when several datasites share one app folder (and with it SyftBox's app log)."""
        return self.private / "logs" / f"{self.app_name}.log"

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

    @property
    def sync_state_file(self) -> Path:
        """The syftbox 0.4.0 client's record of every synced file (the hash of the version the relay holds, and the
        last action on each path): ``LocalState`` in ``syftbox/client/plugins/sync/local_state.py``. Read only."""
        return self.data_dir / "plugins" / "local_syncstate.json"

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

    # -- secure aggregation (shared.wire.secure_schema names what each file holds) ---------------------------
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
        ``<data_dir>/../.syftbox/<first 8 hex of sha256("<server_url>::<email>")>/`` (so one key per datasite), with
        the server URL as the SyftBox client holds it: pydantic's ``AnyHttpUrl`` (scheme and host lower-cased, a
        default port dropped, an empty path made ``/``)."""
        import hashlib  # here, and pydantic too: the supervisor imports this module

        from pydantic import AnyHttpUrl

        url = str(AnyHttpUrl(self.server_url)) if self.server_url else ""
        partition = hashlib.sha256(f"{url}::{self.email}".encode()).hexdigest()[:8]
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

    @staticmethod
    def upload_round(name: str) -> int | None:
        """The round of an upload file's name (``upload_file``), None for any other name."""
        digits = name[1:-5]  # ASCII only: str.isdigit also takes "²", which int() refuses
        return int(digits) if name[:1] == "r" and name.endswith(".json") and digits.isascii() and digits.isdigit() \
            else None

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
