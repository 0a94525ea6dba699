"""The durable outbox: one SQLite file shared by every daemon, the single source of truth.

An event is committed here (WAL, ``synchronous=FULL``: on disk before the commit
returns) before the guard gets any feedback, and it leaves only after the broker has
taken it (``sent``) and, for alarms and tests, the platform has acknowledged it
(``acknowledged``); delivered rows are pruned by age.

Each thread opens its own :class:`Outbox` (SQLite connections are not shared across
threads). Writers take the lock up front (``BEGIN IMMEDIATE``) so that two daemons never
deadlock upgrading a read lock, and wait up to ``busy_timeout`` for each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import sqlite_utils

from edge.contract.events import (
    ACK_REQUIRED,
    Event,
    EventDraft,
    Identity,
    Priority,
    utc_iso,
    utc_now,
    uuid7,
)

SCHEMA_VERSION = 5
BUSY_TIMEOUT_MS = 10_000

QUEUED, SENT, ACKNOWLEDGED = "queued", "sent", "acknowledged"
STATES = (QUEUED, SENT, ACKNOWLEDGED)


class OutboxError(Exception):
    """The outbox cannot do what was asked (for example a newer schema than this code)."""


def _migrate_to_1(db: sqlite_utils.Database) -> None:
    db["events"].create(
        {
            "seq": int,              # per-device sequence number, never reused
            "id": str,               # UUIDv7, globally unique and time-ordered
            "kind": str,
            "code": int,             # Contact ID
            "priority": int,         # edge.contract.events.Priority; lower is published first
            "input": str,
            "occurred_at": str,      # UTC, RFC 3339, when the edge happened
            "committed_at": str,     # UTC, when the row became durable
            "clock_synced": int,
            "boot_id": str,
            "repeat_of": str,
            "ack_required": int,
            "topic": str,            # below the device prefix, e.g. event/alarm
            "payload": bytes,        # exactly what is published, so re-sends are identical
            "state": str,            # queued -> sent (broker PUBACK) -> acknowledged (platform)
            "sent_at": str,
            "acknowledged_at": str,
            "acknowledged_by": str,
        },
        pk="seq",
        not_null=["id", "kind", "code", "priority", "occurred_at", "committed_at",
                  "clock_synced", "boot_id", "ack_required", "topic", "payload", "state"],
        defaults={"state": QUEUED},
    )
    db["events"].create_index(["id"], unique=True)
    # The uplink's only hot query: what to publish next, in priority order.
    db.execute(
        "CREATE INDEX events_queue ON events(priority, seq) WHERE state = 'queued'"
    )
    db.execute("CREATE INDEX events_sent_unacknowledged ON events(seq) "
               "WHERE state = 'sent' AND ack_required = 1")
    db["counters"].create({"name": str, "value": int}, pk="name", not_null=["value"])
    db["latches"].create(
        {"input": str, "alarm_id": str, "latched_at": str, "last_event_id": str, "repeats": int},
        pk="input",
        not_null=["alarm_id", "latched_at", "last_event_id", "repeats"],
    )
    db["daemon_state"].create(
        {"name": str, "state": str, "updated_at": str}, pk="name", not_null=["state", "updated_at"],
    )


def _migrate_to_2(db: sqlite_utils.Database) -> None:
    # Camera snapshots: the JPEG lives in the spool directory, the row says what it is and
    # where it stands. Snapshots are not events: they take no sequence number (a snapshot
    # pruned under the disk budget must not look like a lost event to the platform).
    db["snapshots"].create(
        {
            "id": int,
            "event_id": str,       # the alarm or test it belongs to
            "event_kind": str,     # alarm | test: decides what goes first under pressure
            "camera": str,
            "idx": int,            # 0.. in capture order, pre-alarm first
            "phase": str,          # pre | post
            "captured_at": str,    # UTC, RFC 3339
            "offset_s": float,     # captured_at - the event's occurred_at
            "width": int,
            "height": int,
            "path": str,
            "size": int,
            "committed_at": str,
            "state": str,          # queued -> sent (broker PUBACK)
            "sent_at": str,
        },
        pk="id",
        not_null=["event_id", "event_kind", "camera", "idx", "phase", "captured_at",
                  "offset_s", "path", "size", "committed_at", "state"],
        defaults={"state": QUEUED},
    )
    db.execute("CREATE INDEX snapshots_queue ON snapshots(id) WHERE state = 'queued'")
    db["snapshots"].create_index(["event_id"])


def _migrate_to_3(db: sqlite_utils.Database) -> None:
    # A snapshot is taken once: a camera daemon restarted mid-alarm resumes its numbering
    # instead of queueing a second picture under the same index. Duplicates left by
    # schema 2 go first (their files are swept as orphans when the spool opens).
    db.execute("DELETE FROM snapshots WHERE id NOT IN"
               " (SELECT min(id) FROM snapshots GROUP BY event_id, camera, idx)")
    db.execute("CREATE UNIQUE INDEX snapshots_unique ON snapshots(event_id, camera, idx)")
    # End-to-end alarm tests (edge.daemons.selftest.alarmtest): one row per test, from the
    # request to the platform's acknowledgement, kept for the monthly report.
    db["alarm_tests"].create(
        {
            "id": str,               # UUIDv7
            "trigger": str,          # schedule | manual | platform
            "method": str,           # relay (covers the wiring) | software
            "code": int,             # Contact ID 601 manual / 602 periodic
            "input": str,
            "requested_at": str,
            "scheduled_for": str,    # the schedule's slot (UTC), so a slot runs once
            "started_at": str,
            "finished_at": str,
            "state": str,            # requested -> running -> passed | failed (| refused:
                                     # another test was running; | cancelled by its person)
            "failed_stage": str,     # edge | committed | sent | acknowledged
            "reason": str,
            "event_id": str,         # the test event (601/602) it produced
            "edge_at": str,
            "committed_at": str,
            "sent_at": str,
            "acknowledged_at": str,
            "edge_to_commit_ms": float,
            "commit_to_sent_ms": float,
            "sent_to_ack_ms": float,
            "total_ms": float,
            "request": str,          # JSON: the platform's command (request id, reply topic)
            "reply_state": str,      # pending -> sent: the platform's reply with the result
            "result_event_id": str,  # the test-result event that published it
        },
        pk="id",
        not_null=["trigger", "method", "code", "requested_at", "state"],
    )
    db.execute("CREATE UNIQUE INDEX alarm_tests_slot ON alarm_tests(scheduled_for)"
               " WHERE scheduled_for IS NOT NULL")
    db.execute("CREATE INDEX alarm_tests_open ON alarm_tests(requested_at)"
               " WHERE state IN ('requested', 'running')")
    db.execute("CREATE INDEX alarm_tests_reply ON alarm_tests(id) WHERE reply_state = 'pending'")
    # Uplink sessions, for the time online of the monthly report.
    db["uplink_sessions"].create(
        {"id": int, "session": int, "connected_at": str, "last_seen_at": str,
         "disconnected_at": str, "reason": str},
        pk="id", not_null=["session", "connected_at", "last_seen_at"],
    )


def _migrate_to_4(db: sqlite_utils.Database) -> None:
    # When the acknowledgement reached this device, on this device's clock (the platform's
    # own `acknowledged_at` may come from a clock a few ms, or minutes, apart): the alarm
    # test times its last stage with it.
    db.execute("ALTER TABLE events ADD COLUMN ack_received_at TEXT")
    # The SMS second path (edge.daemons.fallback): one row per alarm it watches, from "watching"
    # to "acknowledged" (no SMS needed) or "sent" (the duty numbers were told).
    db["sms_notifications"].create(
        {
            "event_id": str,         # the alarm
            "state": str,            # watching -> acknowledged | due -> sent | failed
            "committed_at": str,
            "due_at": str,           # committed_at + fallback.ack_timeout_s
            "reason": str,           # why it was sent: no acknowledgement in time, uplink down
            "attempts": int,
            "next_attempt_at": str,
            "recipients": str,       # JSON: number -> {state, refs, error, at}
            "text": str,             # the message as sent
            "sent_at": str,
            "notice_event_id": str,  # the `fallback` event that tells the platform
        },
        pk="event_id",
        not_null=["state", "committed_at", "due_at", "attempts"],
    )
    db.execute("CREATE INDEX sms_open ON sms_notifications(due_at)"
               " WHERE state IN ('watching', 'due')")


def _migrate_to_5(db: sqlite_utils.Database) -> None:
    # How often a test was cut short by its process stopping (a restart, a power cut):
    # it is run again, a few times, before it counts as failed.
    db.execute("ALTER TABLE alarm_tests ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0")


_MIGRATIONS = {1: _migrate_to_1, 2: _migrate_to_2, 3: _migrate_to_3, 4: _migrate_to_4,
               5: _migrate_to_5}


@dataclass(frozen=True)
class QueuedMessage:
    """A row the uplink is about to publish."""

    seq: int
    id: str
    kind: str
    priority: int
    topic: str
    payload: bytes


@dataclass(frozen=True)
class AckResult:
    event_id: str
    known: bool
    already: bool = False


@dataclass
class QueueSummary:
    """What ``guardpost queue`` prints: counts by state and priority, the oldest unsent."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    oldest_unsent_seq: int | None = None
    oldest_unsent_committed_at: str | None = None
    oldest_unsent_age_s: float | None = None
    last_seq: int = 0

    @property
    def unsent(self) -> int:
        return sum(self.counts.get(QUEUED, {}).values())


class Outbox:
    """One connection to the outbox database.

    ``checkpoint=False`` leaves WAL checkpoints to other connections: the button
    daemon uses it so that an alarm commit never pays for copying the WAL back into
    the database file (the uplink, which writes after every batch, does that work).
    """

    def __init__(self, path: str | Path, identity: Identity, *, checkpoint: bool = True):
        self.path = Path(path)
        self.identity = identity
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = os.open(f"{self.path}.writelock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                   0o660)
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
            self._conn = sqlite3.connect(self.path, isolation_level=None,
                                         timeout=BUSY_TIMEOUT_MS / 1000)
        except BaseException:
            os.close(self._write_lock)
            raise
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # Switching a new file to WAL fails at once ("database is locked") if another
            # process is doing the same: two daemons starting together on first boot.
            fcntl.flock(self._write_lock, fcntl.LOCK_EX)
            try:
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            finally:
                fcntl.flock(self._write_lock, fcntl.LOCK_UN)
            if mode.lower() != "wal":
                raise OutboxError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            self._conn.execute("PRAGMA synchronous = FULL")
            if not checkpoint:
                self._conn.execute("PRAGMA wal_autocheckpoint = 0")
            self.db = sqlite_utils.Database(self._conn)
            self._migrate()
            self._adopt_ownership()
        except BaseException:
            self.close()
            raise

    # -- lifecycle -------------------------------------------------------------------

    def _adopt_ownership(self) -> None:
        """Run as root (``guardpost doctor``, ``reset``, ``queue`` by an installer), files
        root creates here would lock the daemons out of their own database: give them
        to the owner of the state directory, as SQLite does for its WAL files."""
        if os.geteuid() != 0:
            return
        owner = self.path.parent.stat()
        if owner.st_uid == 0:
            return
        for name in (self.path, Path(f"{self.path}.writelock"), Path(f"{self.path}-wal"),
                     Path(f"{self.path}-shm")):
            try:
                info = name.stat()
            except FileNotFoundError:
                continue
            if info.st_uid == 0:
                os.chown(name, owner.st_uid, owner.st_gid)

    def close(self) -> None:
        self._conn.close()
        os.close(self._write_lock)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _migrate(self) -> None:
        with self.transaction():
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise OutboxError(
                    f"{self.path}: schema version {version} is newer than this Guardpost "
                    f"({SCHEMA_VERSION}); refusing to touch it"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                _MIGRATIONS[target](self.db)
                self._conn.execute(f"PRAGMA user_version = {target}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, taken with the write lock; on disk when the block ends."""
        # SQLite's own wait for the write lock is a sleep-and-retry loop (1, 2, 5, 10 ...
        # ms): an alarm commit could lose every retry to the uplink's many short
        # transactions during a backlog drain. A blocking flock on a side file wakes the
        # waiting writer the moment the lock is released.
        fcntl.flock(self._write_lock, fcntl.LOCK_EX)
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        finally:
            fcntl.flock(self._write_lock, fcntl.LOCK_UN)

    # -- committing events -----------------------------------------------------------

    def next_counter(self, name: str) -> int:
        """Increment and return a persistent counter (inside a transaction)."""
        row = self._conn.execute(
            "INSERT INTO counters(name, value) VALUES (?, 1) "
            "ON CONFLICT(name) DO UPDATE SET value = value + 1 RETURNING value",
            (name,),
        ).fetchone()
        return row[0]

    def append(self, draft: EventDraft) -> Event:
        """Add an event inside the caller's :meth:`transaction`; it is durable at its end."""
        if not self._conn.in_transaction:
            raise OutboxError("append() must run inside Outbox.transaction()")
        seq = self.next_counter("event_seq")
        event = Event(id=str(uuid7()), seq=seq, draft=draft)
        self._conn.execute(
            "INSERT INTO events(seq, id, kind, code, priority, input, occurred_at, committed_at,"
            " clock_synced, boot_id, repeat_of, ack_required, topic, payload, state)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                seq, event.id, draft.kind.value, int(draft.code), int(draft.priority), draft.input,
                utc_iso(draft.occurred_at), utc_iso(utc_now()), int(draft.clock_synced),
                draft.boot_id, draft.repeat_of, int(draft.kind in ACK_REQUIRED),
                event.topic_suffix, event.payload(self.identity), QUEUED,
            ),
        )
        return event

    def commit_event(self, draft: EventDraft) -> Event:
        """Commit one event durably and return it with its id and sequence number."""
        with self.transaction():
            return self.append(draft)

    # -- the uplink's side -----------------------------------------------------------

    _QUEUED_COLUMNS = "SELECT seq, id, kind, priority, topic, payload FROM events"

    def next_queued(self, limit: int, exclude: Iterable[int] = ()) -> list[QueuedMessage]:
        """Up to ``limit`` queued rows in publishing order, skipping ``exclude`` (in flight)."""
        skip = set(exclude)
        rows = self._conn.execute(
            f"{self._QUEUED_COLUMNS} WHERE state = 'queued' ORDER BY priority, seq LIMIT ?",
            (limit + len(skip),),
        ).fetchall()
        picked = [QueuedMessage(*row) for row in rows if row[0] not in skip]
        return picked[:limit]

    def queued_after(self, priority: int, seq: int, limit: int) -> list[QueuedMessage]:
        """Up to ``limit`` queued rows that come after ``(priority, seq)`` in publishing
        order: how the uplink walks a backlog without re-reading what it has sent."""
        rows = self._conn.execute(
            f"{self._QUEUED_COLUMNS} WHERE state = 'queued' AND priority = ? AND seq > ?"
            " ORDER BY seq LIMIT ?", (priority, seq, limit)).fetchall()
        if len(rows) < limit:
            rows += self._conn.execute(
                f"{self._QUEUED_COLUMNS} WHERE state = 'queued' AND priority > ?"
                " ORDER BY priority, seq LIMIT ?", (priority, limit - len(rows))).fetchall()
        return [QueuedMessage(*row) for row in rows]

    def mark_sent(self, seqs: Iterable[int], at: datetime | None = None) -> int:
        """The broker has taken these rows (PUBACK). Returns how many changed state.

        The uplink calls this for batches (every few tens of milliseconds during a
        drain): rows whose mark is lost in a crash are simply published again, which
        at-least-once delivery allows and the platform de-duplicates by id.
        """
        seqs = list(seqs)
        if not seqs:
            return 0
        stamp = utc_iso(at or utc_now())
        changed = 0
        with self.transaction() as conn:
            for chunk_start in range(0, len(seqs), 500):
                chunk = seqs[chunk_start:chunk_start + 500]
                marks = ",".join("?" * len(chunk))
                changed += conn.execute(
                    f"UPDATE events SET state = 'sent', sent_at = ?"
                    f" WHERE state = 'queued' AND seq IN ({marks})",
                    (stamp, *chunk),
                ).rowcount
        return changed

    def mark_acknowledged(
        self, acks: Iterable[tuple[str, datetime, str | None]]
    ) -> list[AckResult]:
        """The platform has acknowledged these events: ``(event_id, at, by)`` each."""
        results = []
        with self.transaction() as conn:
            for event_id, at, by in acks:
                row = conn.execute("SELECT state FROM events WHERE id = ?", (event_id,)).fetchone()
                if row is None:
                    results.append(AckResult(event_id, known=False))
                elif row[0] == ACKNOWLEDGED:
                    results.append(AckResult(event_id, known=True, already=True))
                else:
                    # An ack can overtake our own bookkeeping of the PUBACK: either way the
                    # broker had the message, so sent_at is filled if it was still missing.
                    received = utc_iso(utc_now())
                    conn.execute(
                        "UPDATE events SET state = 'acknowledged', acknowledged_at = ?,"
                        " acknowledged_by = ?, ack_received_at = ?,"
                        " sent_at = coalesce(sent_at, ?) WHERE id = ?",
                        (utc_iso(at), by, received, received, event_id),
                    )
                    results.append(AckResult(event_id, known=True))
        return results

    def prune(self, keep_days: int, now: datetime | None = None) -> int:
        """Delete delivered rows older than ``keep_days``; never an undelivered one."""
        cutoff = utc_iso((now or utc_now()) - timedelta(days=keep_days))
        with self.transaction() as conn:
            return conn.execute(
                "DELETE FROM events WHERE committed_at < ? AND"
                " (state = 'acknowledged' OR (state = 'sent' AND ack_required = 0))",
                (cutoff,),
            ).rowcount

    # -- reading ---------------------------------------------------------------------

    def event_states(self, event_ids: Iterable[str]) -> dict[str, str]:
        ids = list(event_ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._conn.execute(
            f"SELECT id, state FROM events WHERE id IN ({marks})", ids
        ).fetchall()
        return dict(rows)

    def get_event_row(self, event_id: str) -> dict | None:
        cursor = self._conn.execute("SELECT * FROM events WHERE id = ?", (event_id,))
        row = cursor.fetchone()
        if row is None:
            return None
        return dict(zip([c[0] for c in cursor.description], row, strict=True))

    def summary(self, now: datetime | None = None) -> QueueSummary:
        summary = QueueSummary()
        for state, priority, count in self._conn.execute(
            "SELECT state, priority, count(*) FROM events GROUP BY state, priority"
        ):
            summary.counts.setdefault(state, {})[Priority(priority).name.lower()] = count
        oldest = self._conn.execute(
            "SELECT seq, committed_at FROM events WHERE state = 'queued' ORDER BY seq LIMIT 1"
        ).fetchone()
        if oldest is not None:
            summary.oldest_unsent_seq, summary.oldest_unsent_committed_at = oldest
            committed = datetime.fromisoformat(oldest[1])
            summary.oldest_unsent_age_s = max(0.0, ((now or utc_now()) - committed).total_seconds())
        row = self._conn.execute(
            "SELECT value FROM counters WHERE name = 'event_seq'"
        ).fetchone()
        summary.last_seq = row[0] if row else 0
        return summary

    def backlog(self, now: datetime | None = None) -> dict:
        """The cheap figures of the heartbeat: every query runs on a partial index."""
        queued = self._conn.execute(
            "SELECT count(*) FROM events WHERE state = 'queued'").fetchone()[0]
        unacknowledged = self._conn.execute(
            "SELECT count(*) FROM events WHERE state = 'sent' AND ack_required = 1").fetchone()[0]
        oldest = self._conn.execute(
            "SELECT min(seq) FROM events WHERE state = 'queued'").fetchone()[0]
        age = None
        if oldest is not None:
            committed = self._conn.execute(
                "SELECT committed_at FROM events WHERE seq = ?", (oldest,)).fetchone()[0]
            age = round(max(0.0, ((now or utc_now())
                                  - datetime.fromisoformat(committed)).total_seconds()), 3)
        last = self._conn.execute(
            "SELECT value FROM counters WHERE name = 'event_seq'").fetchone()
        return {"queued": queued, "sent_unacknowledged": unacknowledged,
                "oldest_unsent_age_s": age, "last_seq": last[0] if last else 0}

    # -- daemons' published state (for `guardpost status`) -----------------------------

    def set_daemon_state(self, name: str, state_json: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO daemon_state(name, state, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET state = excluded.state,"
                " updated_at = excluded.updated_at",
                (name, state_json, utc_iso(utc_now())),
            )

    def daemon_states(self) -> dict[str, tuple[str, str]]:
        return {name: (state, updated) for name, state, updated in
                self._conn.execute("SELECT name, state, updated_at FROM daemon_state")}

    # -- uplink sessions: the time online of the monthly report ------------------------

    def session_started(self, session: int, at: datetime | None = None) -> None:
        stamp = utc_iso(at or utc_now())
        with self.transaction() as conn:
            conn.execute("INSERT INTO uplink_sessions(session, connected_at, last_seen_at)"
                         " VALUES (?, ?, ?)", (session, stamp, stamp))

    def session_seen(self, session: int, at: datetime | None = None) -> None:
        """Still connected: a crash ends the session here, not at the next connect."""
        with self.transaction() as conn:
            conn.execute("UPDATE uplink_sessions SET last_seen_at = ? WHERE session = ?"
                         " AND disconnected_at IS NULL", (utc_iso(at or utc_now()), session))

    def session_ended(self, session: int, reason: str, at: datetime | None = None) -> None:
        stamp = utc_iso(at or utc_now())
        with self.transaction() as conn:
            conn.execute("UPDATE uplink_sessions SET last_seen_at = ?, disconnected_at = ?,"
                         " reason = ? WHERE session = ? AND disconnected_at IS NULL",
                         (stamp, stamp, reason, session))

    # -- alarm tests: the platform's replies -------------------------------------------

    def replies_due(self, exclude: Iterable[str] = ()) -> list[tuple[str, dict, str, dict]]:
        """Finished platform-requested tests whose result reply is not yet at the broker:
        ``(test_id, request, state, result)`` each; the result is the test-result
        event's detail."""
        skip = set(exclude)
        rows = self._conn.execute(
            "SELECT t.id, t.request, t.state, e.payload FROM alarm_tests t"
            " LEFT JOIN events e ON e.id = t.result_event_id"
            " WHERE t.reply_state = 'pending' AND t.state IN ('passed', 'failed')").fetchall()
        return [(test_id, json.loads(request), state,
                 json.loads(payload).get("detail", {}) if payload else {})
                for test_id, request, state, payload in rows if test_id not in skip]

    def reply_sent(self, test_id: str, state: str = "sent") -> None:
        """The result reply reached the broker (``sent``), or the broker refused it
        (``refused``: sending it again would be refused again); ``pending`` sends it again."""
        with self.transaction() as conn:
            conn.execute("UPDATE alarm_tests SET reply_state = ? WHERE id = ?",
                         (state, test_id))

    # -- re-publication and inbound (uplink) ---------------------------------------------

    def urgent_queued(self) -> bool:
        """Whether an alarm or a test waits to be published (the uplink then connects at
        once instead of waiting out its backoff)."""
        return self._conn.execute(
            "SELECT 1 FROM events WHERE state = 'queued' AND priority <= ? LIMIT 1",
            (int(Priority.TEST),)).fetchone() is not None

    def sent_unacknowledged(self) -> list[tuple[str, int, int, str | None]]:
        """Events the broker took that the platform has not acknowledged, oldest first:
        ``(id, seq, priority, sent_at)`` each (they are published again until it does)."""
        return self._conn.execute(
            "SELECT id, seq, priority, sent_at FROM events"
            " WHERE state = 'sent' AND ack_required = 1 ORDER BY seq").fetchall()

    def published_rows(self, event_ids: Iterable[str]) -> list[QueuedMessage]:
        """These events as they were published (same bytes), still unacknowledged, in
        publishing order: what the uplink publishes again."""
        ids = list(event_ids)
        rows: list[QueuedMessage] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows += [QueuedMessage(*row) for row in self._conn.execute(
                f"{self._QUEUED_COLUMNS} WHERE id IN ({marks}) AND state != 'acknowledged'",
                chunk)]
        return sorted(rows, key=lambda row: (row.priority, row.seq))

    def platform_test_for(self, request_id: str, since: datetime) -> tuple[str, str] | None:
        """The platform-requested test with this request id asked for after ``since``:
        ``(test_id, state)``, or None."""
        return self._conn.execute(
            "SELECT id, state FROM alarm_tests WHERE trigger = 'platform' AND requested_at >= ?"
            " AND json_extract(request, '$.request_id') = ? ORDER BY requested_at DESC",
            (utc_iso(since), request_id)).fetchone()

    def waiting_tests(self) -> int:
        """Alarm tests requested and not yet started."""
        return self._conn.execute(
            "SELECT count(*) FROM alarm_tests WHERE state = 'requested'").fetchone()[0]

    def last_platform_test_at(self) -> datetime | None:
        """When the platform last asked for a test that was accepted."""
        stamp = self._conn.execute(
            "SELECT max(requested_at) FROM alarm_tests WHERE trigger = 'platform'").fetchone()[0]
        return datetime.fromisoformat(stamp) if stamp else None

    def redirect_test_reply(self, test_id: str, request: dict) -> None:
        """The platform asked again for this test: its answers go where the new request
        asks (its reply topic and correlation data)."""
        with self.transaction() as conn:
            conn.execute("UPDATE alarm_tests SET request = ? WHERE id = ?",
                         (json.dumps(request), test_id))
