"""End-to-end alarm tests (``alarm_tests``): one row per test, from the request to the
platform's acknowledgement, kept for the monthly report.

    requested -> running -> passed | failed
        (| refused: another test was running; | cancelled by its person)

The rules (who may run, how often a test cut short runs again) are
:mod:`edge.daemons.selftest.alarmtest`'s; this module only reads and writes the rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import datetime

from edge.contract.events import utc_iso
from edge.store.table import OutboxTable

FINISHED = ("passed", "failed")


@dataclass(frozen=True)
class AlarmTestRow:
    """One alarm test (times UTC, RFC 3339; stage latencies in ms)."""

    id: str
    trigger: str
    method: str
    code: int
    input: str | None
    requested_at: str
    scheduled_for: str | None
    started_at: str | None
    finished_at: str | None
    state: str
    failed_stage: str | None
    reason: str | None
    event_id: str | None
    edge_at: str | None
    committed_at: str | None
    sent_at: str | None
    acknowledged_at: str | None
    edge_to_commit_ms: float | None
    commit_to_sent_ms: float | None
    sent_to_ack_ms: float | None
    total_ms: float | None
    request: str | None
    reply_state: str | None
    result_event_id: str | None
    interruptions: int


_COLUMNS = ", ".join(f.name for f in fields(AlarmTestRow))
_SELECT = f"SELECT {_COLUMNS} FROM alarm_tests"


@dataclass(frozen=True)
class TestResult:
    """What a finished test records (see :meth:`AlarmTests.record_result`)."""

    state: str
    finished_at: str
    failed_stage: str | None
    reason: str | None
    event_id: str | None
    times: dict
    stages_ms: dict
    result_event_id: str


class AlarmTests(OutboxTable):
    """The ``alarm_tests`` rows of one outbox connection."""

    def request(self, test_id: str, trigger: str, code: int, *, requested_at: datetime,
                scheduled_for: datetime | None = None, request: dict | None = None) -> bool:
        """Record a wanted test; False if its schedule slot already has one."""
        with self._outbox.transaction() as conn:
            return bool(conn.execute(
                "INSERT INTO alarm_tests(id, trigger, method, code, requested_at, scheduled_for,"
                " state, request, reply_state) VALUES (?, ?, '', ?, ?, ?, 'requested', ?, ?)"
                " ON CONFLICT DO NOTHING",
                (test_id, trigger, code, utc_iso(requested_at),
                 utc_iso(scheduled_for) if scheduled_for else None,
                 json.dumps(request) if request is not None else None,
                 "pending" if trigger == "platform" else None)).rowcount)

    def get(self, test_id: str) -> AlarmTestRow | None:
        row = self._db.execute(f"{_SELECT} WHERE id = ?", (test_id,)).fetchone()
        return AlarmTestRow(*row) if row else None

    def requested(self, triggers: Iterable[str]) -> list[str]:
        """Tests waiting to run, oldest first, of these triggers."""
        triggers = tuple(triggers)
        return [row[0] for row in self._db.execute(
            f"SELECT id FROM alarm_tests WHERE state = 'requested' AND trigger IN"
            f" ({', '.join('?' * len(triggers))}) ORDER BY requested_at", triggers)]

    def waiting(self) -> int:
        """How many tests wait to run."""
        return self._db.execute(
            "SELECT count(*) FROM alarm_tests WHERE state = 'requested'").fetchone()[0]

    def latest_finished(self) -> AlarmTestRow | None:
        """The last finished test, whoever ran it."""
        row = self._db.execute(f"{_SELECT} WHERE state IN ('passed', 'failed')"
                               " ORDER BY finished_at DESC LIMIT 1").fetchone()
        return AlarmTestRow(*row) if row else None

    def running(self) -> list[AlarmTestRow]:
        return [AlarmTestRow(*row) for row in
                self._db.execute(f"{_SELECT} WHERE state = 'running'")]

    def by_platform_request(self, request_id: str, since: datetime) -> AlarmTestRow | None:
        """The latest test the platform asked for with this ``request_id`` since ``since``."""
        row = self._db.execute(
            f"{_SELECT} WHERE trigger = 'platform' AND requested_at >= ?"
            " AND json_extract(request, '$.request_id') = ? ORDER BY requested_at DESC",
            (utc_iso(since), request_id)).fetchone()
        return AlarmTestRow(*row) if row else None

    def last_platform_request_at(self) -> datetime | None:
        """When the platform last asked for a test that was accepted."""
        stamp = self._db.execute("SELECT max(requested_at) FROM alarm_tests"
                                 " WHERE trigger = 'platform'").fetchone()[0]
        return datetime.fromisoformat(stamp) if stamp else None

    def asked_again(self, test_id: str, request: dict, *, result_again: bool) -> None:
        """The platform asked again for this test: its answers go where the new request
        asks (reply topic, correlation data), and a finished test's result is sent again."""
        with self._outbox.transaction() as conn:
            conn.execute("UPDATE alarm_tests SET request = ?,"
                         " reply_state = CASE WHEN ? THEN 'pending' ELSE reply_state END"
                         " WHERE id = ?", (json.dumps(request), int(result_again), test_id))

    # -- a test's course (each in its own transaction unless said otherwise) ------------

    def start(self, test_id: str, *, at: datetime, method: str,
              input_name: str | None) -> AlarmTestRow | None:
        """requested -> running; None if the test was not waiting to run."""
        with self._outbox.transaction():
            row = self.get(test_id)
            if row is None or row.state != "requested":
                return None
            self._db.execute("UPDATE alarm_tests SET state = 'running', started_at = ?,"
                             " method = ?, input = ? WHERE id = ?",
                             (utc_iso(at), method, input_name, test_id))
        return self.get(test_id)

    def end_without_result(self, test_id: str, state: str, *, at: datetime, reason: str,
                           only_if_requested: bool = False) -> None:
        """``cancelled`` (its person stopped it) or ``refused`` (another test was running)."""
        guard = " AND state = 'requested'" if only_if_requested else ""
        with self._outbox.transaction() as conn:
            conn.execute("UPDATE alarm_tests SET state = ?, finished_at = ?, reason = ?"
                         f" WHERE id = ?{guard}", (state, utc_iso(at), reason, test_id))

    def interrupted(self, test_id: str, run_again_below: int) -> int:
        """Count one more interruption; below ``run_again_below`` the test is requested
        again. Returns the interruptions so far."""
        with self._outbox.transaction() as conn:
            count = conn.execute("UPDATE alarm_tests SET interruptions = interruptions + 1"
                                 " WHERE id = ? RETURNING interruptions",
                                 (test_id,)).fetchone()[0]
            if count < run_again_below:
                conn.execute("UPDATE alarm_tests SET state = 'requested', started_at = NULL"
                             " WHERE id = ?", (test_id,))
        return count

    def record_result(self, test_id: str, result: TestResult) -> None:
        """The outcome (inside the caller's transaction, with its result event)."""
        t, ms = result.times, result.stages_ms
        self._db.execute(
            "UPDATE alarm_tests SET state = ?, finished_at = ?, failed_stage = ?, reason = ?,"
            " event_id = ?, edge_at = ?, committed_at = ?, sent_at = ?, acknowledged_at = ?,"
            " edge_to_commit_ms = ?, commit_to_sent_ms = ?, sent_to_ack_ms = ?, total_ms = ?,"
            " result_event_id = ? WHERE id = ?",
            (result.state, result.finished_at, result.failed_stage, result.reason,
             result.event_id, t.get("edge"), t.get("committed"), t.get("sent"),
             t.get("acknowledged"), ms.get("edge_to_commit"), ms.get("commit_to_sent"),
             ms.get("sent_to_ack"), ms.get("total"), result.result_event_id, test_id))

    # -- the platform's replies ----------------------------------------------------------

    def replies_due(self, exclude: Iterable[str] = ()) -> list[tuple[str, dict, str, dict]]:
        """Finished platform-requested tests whose result reply is not yet at the broker:
        ``(test_id, request, state, result)`` each; the result is the test-result
        event's detail."""
        skip = set(exclude)
        due = []
        for test_id, request, state, result_event_id in self._db.execute(
                "SELECT id, request, state, result_event_id FROM alarm_tests"
                " WHERE reply_state = 'pending' AND state IN ('passed', 'failed')").fetchall():
            if test_id in skip:
                continue
            event = self._outbox.event(result_event_id) if result_event_id else None
            detail = json.loads(event.payload).get("detail", {}) if event else {}
            due.append((test_id, json.loads(request), state, detail))
        return due

    def reply_state(self, test_id: str, state: str) -> None:
        with self._outbox.transaction() as conn:
            conn.execute("UPDATE alarm_tests SET reply_state = ? WHERE id = ?", (state, test_id))


def tests_requested_between(db, start: datetime, end: datetime) -> list[AlarmTestRow]:
    """The tests requested in ``[start, end)``, in order (``db``: any outbox connection)."""
    return [AlarmTestRow(*row) for row in db.execute(
        f"{_SELECT} WHERE requested_at >= ? AND requested_at < ? ORDER BY requested_at",
        (utc_iso(start), utc_iso(end)))]
