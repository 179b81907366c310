"""The aggregator's own folders that only some may read: the epoch (its cohort), each member's inbox and safe zones
(that member). A later grant above them (in ``app_data/``, say) exposed all three, and nothing noticed: each tick now
checks them again, withdraws what is exposed (said once per kind, however many members), writes nothing there
while it lasts, and puts everything back once the grant is gone."""

from __future__ import annotations

import logging
import os
import re
import time

import pytest
import yaml

from cpu_tracker_aggregator.aggregator import Aggregator
from shared import permissions
from shared.permissions import ensure_permissions
from tests.secure_harness import AGG, Net, t


def _now(net: Net):
    """The time of the aggregator's last tick in ``net`` (after its round closed): a tick at it closes nothing new."""
    return t(net.round * net.round_s + net.deadline + 1.0)


GRANT = yaml.safe_dump([{"path": "**", "user": "*", "permissions": ["read"]}])


def test_a_grant_above_the_aggregators_own_folders_withdraws_them_until_it_is_gone(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    net = Net(tmp_path, 4, monkeypatch)
    for _ in range(3):
        net.step()
    p = net.agg.paths
    inboxes = [p.inbox_file(m) for m in net.members]
    ensure_permissions(p.zones_dir(net.members[0]), AGG, [net.members[0]])
    p.zones_file(net.members[0]).write_text("{}")
    assert p.epoch_file().exists() and all(f.exists() for f in inboxes)
    agg = Aggregator(p, net.settings, net.agg.problems)
    agg.features["secure"].rounds = net.agg  # the aggregator's own secure rounds, as it runs them

    grant = p.my_datasite / "app_data" / "syftperm.yaml"
    grant.write_text(GRANT)
    caplog.clear()
    for _ in range(2):
        agg.tick(_now(net))
        net.step()  # the rounds go on: nothing is written where others could read it
    assert not p.epoch_file().exists() and not any(f.exists() for f in inboxes)
    assert not p.zones_file(net.members[0]).exists()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3, errors  # epoch, inboxes (all four in one line), zones
    assert all(str(grant) in e and "rule 1" in e for e in errors)
    assert any("(4 inbox folders; the first shown)" in e for e in errors)

    grant.unlink()
    for _ in range(3):
        agg.tick(_now(net))
        net.step()
    assert p.epoch_file().exists() and all(f.exists() for f in inboxes)
    assert "the inbox folders' permission files are safe again" in caplog.text


def _in_place(folder):
    """The inbox's syftperm.yaml rewritten in place, its reader turned into a pattern (everyone to the Go server) in
    as many bytes, mtime put back: inode, size and mtime as they were."""
    target = folder / "syftperm.yaml"
    before, data = target.stat(), target.read_bytes()
    reader = re.search(rb"user: (m\d\d@example\.org)", data).group(1)
    with open(target, "r+b") as f:
        f.write(data.replace(reader, b"'*" + reader[2:-1] + b"'"))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    return target


def _stray(folder):
    target = folder / "notes.syftperm.yaml"
    target.write_bytes((folder / "syftperm.yaml").read_bytes())  # safe rules, under a name the relay misreads
    return target


@pytest.mark.parametrize("change", [_in_place, _stray], ids=["rewritten in place, mtime and size kept", "a stray"])
def test_an_inbox_permission_file_changed_between_two_ticks_is_caught_at_the_next(tmp_path, monkeypatch, caplog,
                                                                                   change):
    """The verdicts on 10,000 inbox folders are kept from tick to tick (every stamp trusted here: RACY_NS 0); a change
    to one inbox's permission files withdraws that inbox at the very next tick, and only that one."""
    monkeypatch.setattr(permissions, "RACY_NS", 0, raising=False)
    net = Net(tmp_path, 4, monkeypatch)
    for _ in range(3):
        net.step()
    p = net.agg.paths
    agg = Aggregator(p, net.settings, net.agg.problems)
    agg.features["secure"].rounds = net.agg
    agg.tick(_now(net))
    time.sleep(0.05)  # past a tick of the kernel's coarse ctime clock
    agg.tick(_now(net))  # verdicts kept from here
    assert all(p.inbox_file(m).exists() for m in net.members)
    caplog.set_level(logging.ERROR)
    target = change(p.inbox_dir(net.members[1]))
    agg.tick(_now(net))
    assert not p.inbox_file(net.members[1]).exists()
    assert all(p.inbox_file(m).exists() for m in net.members if m != net.members[1])
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(target) in errors[0], errors
