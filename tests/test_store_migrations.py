"""Schema migrations in plain sqlite3: the same schema as the sqlite-utils migrations
before them, and a device's version-5 outbox upgraded in place with nothing lost."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from edge.contract.events import ContactId, EventDraft, EventKind, Identity, utc_now
from edge.store import schema
from edge.store.event_ids import seq_of
from edge.store.outbox import Outbox

IDENTITY = Identity("test-school", "gate-1", "South gate")
# Built by the sqlite-utils migrations of commit ee40f1b, with rows in every state.
VERSION_5 = Path(__file__).parent / "data" / "outbox-v5.sql"


def master(conn: sqlite3.Connection) -> list[tuple]:
    return sorted(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))


@pytest.fixture
def version_5(tmp_path) -> Path:
    path = tmp_path / "outbox.db"
    conn = sqlite3.connect(path)
    conn.executescript(VERSION_5.read_text())
    conn.close()
    return path


def test_the_plain_migrations_build_the_schema_sqlite_utils_built(version_5, tmp_path):
    fresh = sqlite3.connect(tmp_path / "fresh.db", isolation_level=None)
    schema.migrate(fresh, target=5)
    assert master(fresh) == master(sqlite3.connect(version_5))


def test_a_version_5_outbox_is_upgraded_in_place_with_every_row_kept(version_5):
    before = sqlite3.connect(version_5)
    rows = {table: sorted(before.execute(f"SELECT * FROM {table}"))
            for table in ("events", "latches", "daemon_state", "snapshots", "alarm_tests",
                          "uplink_sessions")}
    old_ids = {state: [r[0] for r in before.execute(
        "SELECT id FROM events WHERE state = ? ORDER BY seq", (state,))]
        for state in ("queued", "sent", "acknowledged")}
    before.close()
    with Outbox(version_5, IDENTITY) as outbox:
        assert schema.schema_version(outbox.db) == schema.SCHEMA_VERSION
        for table, kept in rows.items():
            now = sorted(outbox.db.execute(f"SELECT * FROM {table}"))
            assert [r[:len(kept[0])] for r in now] == kept, table
        # The counts start exact.
        summary = outbox.summary()
        assert summary.counts["queued"] and summary.unsent == len(old_ids["queued"])
        assert summary.last_seq == 12
        # Ids of before (no seq in them) are still found: acknowledged, looked up.
        legacy = old_ids["sent"][0]
        assert outbox.event_states([legacy]) == {legacy: "sent"}
        assert outbox.event(old_ids["queued"][0]).state == "queued"
        [result] = outbox.mark_acknowledged([(legacy, utc_now(), "operator 7")])
        assert result.known and not result.already
        assert outbox.mark_acknowledged([(old_ids["acknowledged"][0], utc_now(), None)])[0].already
        # New events go on from the old sequence, with ids that carry it.
        event = outbox.commit_event(EventDraft(
            kind=EventKind.ALARM, code=ContactId.PANIC, occurred_at=utc_now(),
            clock_synced=True, boot_id="boot", input="gate"))
        assert event.seq == 13 and seq_of(event.id) == 13
        assert outbox.event_states([event.id]) == {event.id: "queued"}
        assert outbox.backlog()["queued"] == len(old_ids["queued"]) + 1
        # The latch of before still names its alarm.
        [latch] = outbox.latches.all().values()
        assert outbox.event(latch.alarm_id) is not None
        # Delivered rows of before are pruned; undelivered ones are not.
        pruned = outbox.prune(keep_days=1, now=utc_now() + timedelta(days=2))
        assert pruned >= len(old_ids["acknowledged"]) + 1
        assert outbox.event(old_ids["queued"][0]) is not None
        recount = dict(outbox.db.execute("SELECT state, count(*) FROM events GROUP BY state"))
        assert outbox.summary().unsent == recount["queued"]


def test_a_database_from_a_newer_guardpost_is_left_untouched(version_5):
    conn = sqlite3.connect(version_5)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(Exception, match="newer"):
        Outbox(version_5, IDENTITY)
    assert "events_prunable" not in {r[1] for r in master(sqlite3.connect(version_5))}
