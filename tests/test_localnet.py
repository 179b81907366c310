"""End-to-end check of tests.localnet on a real 3-client SyftBox network: the relay delivers a file only to
the datasite its syftperm.yaml names, and never uploads anything outside datasites/.

Runs syftbox from the test's own environment (run.sh installs syftbox==0.4.0 there).
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from tests.localnet.network import Datasite, LocalNetwork

VENV = Path(sys.prefix)
OWNER, READER, OUTSIDER = "owner@example.org", "reader@example.org", "outsider@example.org"
SYNC_TIMEOUT = 30

READER_ONLY_PERM = f"""\
- path: '**'
  permissions: [admin, create, write, read]
  user: {OWNER}
- path: '**'
  permissions: [read]
  user: {READER}
"""


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory):
    with LocalNetwork(tmp_path_factory.mktemp("localnet"), VENV / "bin", [OWNER, READER, OUTSIDER]) as n:
        yield n


def sync_barrier(net: LocalNetwork, writer: Datasite, reader: Datasite) -> None:
    """Return once ``reader`` holds a new public file of ``writer``: it has synced after that file was written."""
    marker = writer.datasites / writer.email / "public" / f"barrier-{uuid.uuid4().hex}.txt"
    marker.write_text("barrier")
    copy = reader.datasites / writer.email / "public" / marker.name
    net.wait_for(copy.is_file, SYNC_TIMEOUT, what=f"{reader.email} to receive {marker.name}")


@pytest.mark.network
def test_file_reaches_only_the_reader_its_permission_names(net: LocalNetwork) -> None:
    owner, reader, outsider = (net.sites[e] for e in (OWNER, READER, OUTSIDER))
    rel = Path(OWNER, "app_data", "x")
    folder = owner.datasites / rel
    folder.mkdir(parents=True)
    (folder / "syftperm.yaml").write_text(READER_ONLY_PERM)
    (folder / "data.txt").write_text("for the reader only")

    net.wait_for((reader.datasites / rel / "data.txt").is_file, SYNC_TIMEOUT, what="the reader to get data.txt")
    assert (reader.datasites / rel / "data.txt").read_text() == "for the reader only"
    assert (net.server_files() / rel / "data.txt").read_text() == "for the reader only"

    # Two full sync cycles of the outsider after the file reached the server: it had every chance to get it.
    sync_barrier(net, owner, outsider)
    sync_barrier(net, owner, outsider)
    assert not (outsider.datasites / OWNER / "app_data").exists()


@pytest.mark.network
def test_files_outside_datasites_are_never_uploaded(net: LocalNetwork) -> None:
    owner, reader = net.sites[OWNER], net.sites[READER]
    secret = f"secret-{uuid.uuid4().hex}".encode()
    private = owner.data_dir / "private" / "cpu_tracker"
    private.mkdir(parents=True)
    (private / "secret.txt").write_bytes(secret)

    sync_barrier(net, owner, reader)
    sync_barrier(net, owner, reader)
    assert net.server_db_files()
    server_files = [p for p in net.server_data.rglob("*") if p.is_file()]
    assert not [p for p in server_files if p.name == "secret.txt" or secret in p.read_bytes()]
