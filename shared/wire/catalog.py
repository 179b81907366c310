"""Every wire format's JSON Schema, by the file name it is published and committed under (``shared/wire/schemas/``).

Above both ``schema`` and ``secure_schema`` (which builds on ``schema``), so neither imports the other's dependents.
``python -m shared.wire.catalog`` regenerates the committed schemas after a model change (a test fails until then).
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.paths import DASHBOARD_SCHEMA_FILE, REPORT_SCHEMA_FILE
from shared.wire import secure_schema as sec
from shared.wire.schema import (Current, Dashboard, HistoryIndex, MemberReport, MonitorSignalsFile, MonitorsFile,
                                SafeZonesFile, Segment)

SCHEMA_DIR = Path(__file__).parent / "schemas"


def json_schemas() -> dict[str, dict]:
    """The JSON Schemas of the wire formats, by file name."""
    return {
        "secure_join.schema.json": sec.SecureJoin.model_json_schema(mode="serialization"),
        "secure_epoch.schema.json": sec.Epoch.model_json_schema(mode="serialization"),
        "secure_round.schema.json": sec.SecureUpload.model_json_schema(mode="serialization"),
        "secure_answers.schema.json": sec.SecureAnswers.model_json_schema(mode="serialization"),
        "secure_inbox.schema.json": sec.Inbox.model_json_schema(mode="serialization"),
        "secure_rounds.schema.json": sec.RoundOutcomes.model_json_schema(mode="serialization"),
        REPORT_SCHEMA_FILE: MemberReport.model_json_schema(mode="serialization"),
        DASHBOARD_SCHEMA_FILE: Dashboard.model_json_schema(mode="serialization"),
        "current.schema.json": Current.model_json_schema(mode="serialization"),
        "history_segment.schema.json": Segment.model_json_schema(mode="serialization"),
        "history_index.schema.json": HistoryIndex.model_json_schema(mode="serialization"),
        "monitors.schema.json": MonitorsFile.model_json_schema(mode="serialization"),
        "safe_zones.schema.json": SafeZonesFile.model_json_schema(mode="serialization"),
        "monitor_signals.schema.json": MonitorSignalsFile.model_json_schema(mode="serialization"),
    }


def schema_text(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # regenerate the committed schemas
    for name, schema in json_schemas().items():
        (SCHEMA_DIR / name).write_text(schema_text(schema))
        print(f"wrote {SCHEMA_DIR / name}")
