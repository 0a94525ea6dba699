"""The outbox's schema and its migrations, in plain ``sqlite3``.

``PRAGMA user_version`` is the schema version. Each migration runs once, inside the
write transaction that opens a database older than this code, and a database newer than
this code is refused, never touched. Versions 1 to 5 create exactly the tables and
indexes the ``sqlite-utils`` migrations of earlier releases created (the same
``sqlite_master`` text), so a device upgrades in place; ``sqlite-utils`` stays a
dependency for people reading the database, but no daemon imports it.

Version 6 makes the hot paths cheap at a million rows:

- the unique index on ``events.id`` goes: an event id now carries its sequence number
  (:mod:`edge.store.event_ids`), so an acknowledgement finds its row through the primary
  key. Rows written before keep a partial index of their own (``events_legacy_id``),
  which new rows never touch;
- exact counts of events by state, priority and ``ack_required`` live in the
  ``counters`` table, kept by triggers in the same transaction as every change (the
  page is written by every commit anyway, for the sequence number);
- ``events_prunable`` finds delivered rows by age without a scan;
- the SMS timers keep monotonic deadlines (``due_mono``, ``next_attempt_mono``) with the
  boot they belong to, so a step of the wall clock does not move them.

Version 7 names the outbox's history: ``meta`` holds the epoch (:mod:`edge.store.watermark`)
and what became of the history before it; ``events.recovered_from`` marks an event read
back from a damaged outbox (:mod:`edge.store.salvage`).

Version 8 remembers the nonces of the signed platform messages the device accepted
(:mod:`edge.store.nonces`), so none is accepted twice.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

SCHEMA_VERSION = 8

# The rows the hourly prune may delete: delivered, and nobody waits for anything more.
PRUNABLE = "(state = 'acknowledged' OR (state = 'sent' AND ack_required = 0))"

# The counter that holds the number of events of one (state, priority, ack_required).
COUNT_NAME = "'events/' || {row}.state || '/' || {row}.priority || '/' || {row}.ack_required"
COUNT_PREFIX = "events/"


def _migrate_to_1(conn: sqlite3.Connection) -> None:
    conn.execute('CREATE TABLE "events" (\n'
                 '   "seq" INTEGER PRIMARY KEY,\n'     # per-device, never reused
                 '   "id" TEXT NOT NULL,\n'            # UUIDv7, globally unique, time-ordered
                 '   "kind" TEXT NOT NULL,\n'
                 '   "code" INTEGER NOT NULL,\n'       # Contact ID
                 '   "priority" INTEGER NOT NULL,\n'   # edge.contract.events.Priority
                 '   "input" TEXT,\n'
                 '   "occurred_at" TEXT NOT NULL,\n'   # UTC, RFC 3339, when the edge happened
                 '   "committed_at" TEXT NOT NULL,\n'  # UTC, when the row became durable
                 '   "clock_synced" INTEGER NOT NULL,\n'
                 '   "boot_id" TEXT NOT NULL,\n'
                 '   "repeat_of" TEXT,\n'
                 '   "ack_required" INTEGER NOT NULL,\n'
                 '   "topic" TEXT NOT NULL,\n'         # below the device prefix: event/alarm
                 '   "payload" BLOB NOT NULL,\n'       # exactly what is published
                 '   "state" TEXT NOT NULL DEFAULT \'queued\',\n'  # -> sent -> acknowledged
                 '   "sent_at" TEXT,\n'
                 '   "acknowledged_at" TEXT,\n'
                 '   "acknowledged_by" TEXT\n'
                 ')')
    conn.execute('CREATE UNIQUE INDEX "idx_events_id"\n    ON "events" ("id")')
    # The uplink's walk of the queue, in publishing order.
    conn.execute("CREATE INDEX events_queue ON events(priority, seq) WHERE state = 'queued'")
    conn.execute("CREATE INDEX events_sent_unacknowledged ON events(seq) "
                 "WHERE state = 'sent' AND ack_required = 1")
    conn.execute('CREATE TABLE "counters" (\n   "name" TEXT PRIMARY KEY,\n'
                 '   "value" INTEGER NOT NULL\n)')
    conn.execute('CREATE TABLE "latches" (\n   "input" TEXT PRIMARY KEY,\n'
                 '   "alarm_id" TEXT NOT NULL,\n   "latched_at" TEXT NOT NULL,\n'
                 '   "last_event_id" TEXT NOT NULL,\n   "repeats" INTEGER NOT NULL\n)')
    conn.execute('CREATE TABLE "daemon_state" (\n   "name" TEXT PRIMARY KEY,\n'
                 '   "state" TEXT NOT NULL,\n   "updated_at" TEXT NOT NULL\n)')


def _migrate_to_2(conn: sqlite3.Connection) -> None:
    # Camera snapshots: the JPEG lives in the spool directory, the row says what it is and
    # where it stands. Snapshots take no sequence number (a snapshot pruned under the disk
    # budget must not look like a lost event to the platform).
    conn.execute('CREATE TABLE "snapshots" (\n'
                 '   "id" INTEGER PRIMARY KEY,\n'
                 '   "event_id" TEXT NOT NULL,\n'
                 '   "event_kind" TEXT NOT NULL,\n'   # alarm | test: what goes first
                 '   "camera" TEXT NOT NULL,\n'
                 '   "idx" INTEGER NOT NULL,\n'       # 0.. in capture order, pre-alarm first
                 '   "phase" TEXT NOT NULL,\n'        # pre | post
                 '   "captured_at" TEXT NOT NULL,\n'
                 '   "offset_s" REAL NOT NULL,\n'     # captured_at - the event's occurred_at
                 '   "width" INTEGER,\n'
                 '   "height" INTEGER,\n'
                 '   "path" TEXT NOT NULL,\n'
                 '   "size" INTEGER NOT NULL,\n'
                 '   "committed_at" TEXT NOT NULL,\n'
                 '   "state" TEXT NOT NULL DEFAULT \'queued\',\n'  # -> sent (broker PUBACK)
                 '   "sent_at" TEXT\n'
                 ')')
    conn.execute("CREATE INDEX snapshots_queue ON snapshots(id) WHERE state = 'queued'")
    conn.execute('CREATE INDEX "idx_snapshots_event_id"\n    ON "snapshots" ("event_id")')


def _migrate_to_3(conn: sqlite3.Connection) -> None:
    # A snapshot is taken once; duplicates left by schema 2 go first.
    conn.execute("DELETE FROM snapshots WHERE id NOT IN"
                 " (SELECT min(id) FROM snapshots GROUP BY event_id, camera, idx)")
    conn.execute("CREATE UNIQUE INDEX snapshots_unique ON snapshots(event_id, camera, idx)")
    # End-to-end alarm tests (edge.store.alarm_tests): one row per test, kept for the report.
    conn.execute('CREATE TABLE "alarm_tests" (\n'
                 '   "id" TEXT PRIMARY KEY,\n'
                 '   "trigger" TEXT NOT NULL,\n'      # schedule | manual | platform
                 '   "method" TEXT NOT NULL,\n'       # relay | software
                 '   "code" INTEGER NOT NULL,\n'      # Contact ID 601 / 602
                 '   "input" TEXT,\n'
                 '   "requested_at" TEXT NOT NULL,\n'
                 '   "scheduled_for" TEXT,\n'         # the schedule's slot: it runs once
                 '   "started_at" TEXT,\n'
                 '   "finished_at" TEXT,\n'
                 '   "state" TEXT NOT NULL,\n'
                 '   "failed_stage" TEXT,\n'
                 '   "reason" TEXT,\n'
                 '   "event_id" TEXT,\n'
                 '   "edge_at" TEXT,\n'
                 '   "committed_at" TEXT,\n'
                 '   "sent_at" TEXT,\n'
                 '   "acknowledged_at" TEXT,\n'
                 '   "edge_to_commit_ms" REAL,\n'
                 '   "commit_to_sent_ms" REAL,\n'
                 '   "sent_to_ack_ms" REAL,\n'
                 '   "total_ms" REAL,\n'
                 '   "request" TEXT,\n'               # JSON: the platform's command
                 '   "reply_state" TEXT,\n'           # pending -> sent | refused
                 '   "result_event_id" TEXT\n'
                 ')')
    conn.execute("CREATE UNIQUE INDEX alarm_tests_slot ON alarm_tests(scheduled_for)"
                 " WHERE scheduled_for IS NOT NULL")
    conn.execute("CREATE INDEX alarm_tests_open ON alarm_tests(requested_at)"
                 " WHERE state IN ('requested', 'running')")
    conn.execute("CREATE INDEX alarm_tests_reply ON alarm_tests(id) WHERE reply_state = 'pending'")
    conn.execute('CREATE TABLE "uplink_sessions" (\n'
                 '   "id" INTEGER PRIMARY KEY,\n   "session" INTEGER NOT NULL,\n'
                 '   "connected_at" TEXT NOT NULL,\n   "last_seen_at" TEXT NOT NULL,\n'
                 '   "disconnected_at" TEXT,\n   "reason" TEXT\n)')


def _migrate_to_4(conn: sqlite3.Connection) -> None:
    # When the acknowledgement reached this device, on this device's clock.
    conn.execute("ALTER TABLE events ADD COLUMN ack_received_at TEXT")
    # The SMS second path (edge.store.sms): one row per alarm it watches.
    conn.execute('CREATE TABLE "sms_notifications" (\n'
                 '   "event_id" TEXT PRIMARY KEY,\n'
                 '   "state" TEXT NOT NULL,\n'        # watching -> acknowledged | due -> sent
                 '   "committed_at" TEXT NOT NULL,\n'
                 '   "due_at" TEXT NOT NULL,\n'
                 '   "reason" TEXT,\n'
                 '   "attempts" INTEGER NOT NULL,\n'
                 '   "next_attempt_at" TEXT,\n'
                 '   "recipients" TEXT,\n'            # JSON: number -> its results
                 '   "text" TEXT,\n'
                 '   "sent_at" TEXT,\n'
                 '   "notice_event_id" TEXT\n'
                 ')')
    conn.execute("CREATE INDEX sms_open ON sms_notifications(due_at)"
                 " WHERE state IN ('watching', 'due')")


def _migrate_to_5(conn: sqlite3.Connection) -> None:
    # How often a test was cut short by its process stopping.
    conn.execute("ALTER TABLE alarm_tests ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0")


def _migrate_to_6(conn: sqlite3.Connection) -> None:
    # Ids written from now on carry their sequence number; the rows before keep an index
    # of their own, bounded by a literal so that no new row ever enters it.
    legacy = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
    conn.execute('DROP INDEX "idx_events_id"')
    if legacy:
        conn.execute(f"CREATE UNIQUE INDEX events_legacy_id ON events(id) WHERE seq <= {legacy:d}")
    conn.execute("INSERT INTO counters(name, value) VALUES ('legacy_id_max_seq', ?)"
                 " ON CONFLICT(name) DO UPDATE SET value = excluded.value", (legacy,))
    conn.execute(f"CREATE INDEX events_prunable ON events(committed_at) WHERE {PRUNABLE}")
    conn.execute("INSERT INTO counters(name, value)"
                 f" SELECT {COUNT_NAME.format(row='events')}, count(*) FROM events"
                 " GROUP BY state, priority, ack_required")
    new, old = COUNT_NAME.format(row="NEW"), COUNT_NAME.format(row="OLD")
    conn.execute("CREATE TRIGGER events_count_insert AFTER INSERT ON events BEGIN"
                 f" INSERT INTO counters(name, value) VALUES ({new}, 1)"
                 " ON CONFLICT(name) DO UPDATE SET value = value + 1; END")
    conn.execute("CREATE TRIGGER events_count_delete AFTER DELETE ON events BEGIN"
                 f" UPDATE counters SET value = value - 1 WHERE name = {old}; END")
    conn.execute("CREATE TRIGGER events_count_update AFTER UPDATE OF state, priority,"
                 " ack_required ON events WHEN OLD.state IS NOT NEW.state OR OLD.priority"
                 " IS NOT NEW.priority OR OLD.ack_required IS NOT NEW.ack_required BEGIN"
                 f" UPDATE counters SET value = value - 1 WHERE name = {old};"
                 f" INSERT INTO counters(name, value) VALUES ({new}, 1)"
                 " ON CONFLICT(name) DO UPDATE SET value = value + 1; END")
    conn.execute("ALTER TABLE sms_notifications ADD COLUMN boot_id TEXT")
    conn.execute("ALTER TABLE sms_notifications ADD COLUMN due_mono REAL")
    conn.execute("ALTER TABLE sms_notifications ADD COLUMN remaining_s REAL")
    conn.execute("ALTER TABLE sms_notifications ADD COLUMN next_attempt_mono REAL")
    # The snapshots the daily prune may delete, found without a scan.
    conn.execute("CREATE INDEX snapshots_sent ON snapshots(committed_at) WHERE state = 'sent'")


def _migrate_to_7(conn: sqlite3.Connection) -> None:
    conn.execute('CREATE TABLE "meta" (\n   "name" TEXT PRIMARY KEY,\n'
                 '   "value" TEXT NOT NULL\n)')
    # The damaged outbox (its name under damaged/) an event was read back from.
    conn.execute("ALTER TABLE events ADD COLUMN recovered_from TEXT")


def _migrate_to_8(conn: sqlite3.Connection) -> None:
    # A row lives while its message could still pass the time rules (docs/contract.md,
    # "Replay"): a few rows, looked up by nonce, pruned by (key, time).
    conn.execute('CREATE TABLE "accepted_nonces" (\n   "nonce" TEXT PRIMARY KEY,\n'
                 '   "key_id" TEXT NOT NULL,\n   "signed_at" TEXT NOT NULL\n)')
    conn.execute("CREATE INDEX accepted_nonces_key_time ON accepted_nonces(key_id, signed_at)")


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _migrate_to_1, 2: _migrate_to_2, 3: _migrate_to_3, 4: _migrate_to_4, 5: _migrate_to_5,
    6: _migrate_to_6, 7: _migrate_to_7, 8: _migrate_to_8}


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> None:
    """Bring the schema from its version to ``target``, inside the caller's transaction."""
    for version in range(schema_version(conn) + 1, target + 1):
        MIGRATIONS[version](conn)
        conn.execute(f"PRAGMA user_version = {version:d}")
