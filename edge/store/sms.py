"""The SMS second path's rows (``sms_notifications``): one per alarm the fallback watches.

    watching --(platform acknowledged in time)--> acknowledged   (no SMS)
        \\--(timeout, or uplink down)--> due --(every number sent or given up)--> sent
                                          \\--(every number given up)--> failed

The timers are kept on the monotonic clock, with the boot they belong to: ``due_mono``
(when the SMS is due unless the platform acknowledges) and ``next_attempt_mono`` (the
pause before the next try). A step of the wall clock (NTP's first sync at boot moves a
Pi's clock by hours) cannot move them. ``remaining_s`` is what was left of the wait
when the watch began: after a reboot, where the old monotonic times mean nothing, the
wait starts again from the restart with that much, never more. ``due_at`` and
``next_attempt_at`` are the same moments on the wall clock, for people reading the row.
The rules themselves are :mod:`edge.daemons.fallback`'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, fields

from edge.store.table import OutboxTable

OPEN = ("watching", "due")


@dataclass(frozen=True)
class SmsRow:
    """One alarm the fallback watches (``recipients``: JSON, number -> its results)."""

    event_id: str
    state: str
    committed_at: str
    due_at: str
    reason: str | None
    attempts: int
    next_attempt_at: str | None
    recipients: str | None
    text: str | None
    sent_at: str | None
    notice_event_id: str | None
    boot_id: str | None
    due_mono: float | None
    remaining_s: float | None
    next_attempt_mono: float | None

    def results(self) -> dict[str, dict]:
        return json.loads(self.recipients or "{}")


_SELECT = f"SELECT {', '.join(f.name for f in fields(SmsRow))} FROM sms_notifications"


class SmsNotifications(OutboxTable):
    """The fallback's rows; the writing methods run inside the caller's transaction."""

    def get(self, event_id: str) -> SmsRow | None:
        row = self._db.execute(f"{_SELECT} WHERE event_id = ?", (event_id,)).fetchone()
        return SmsRow(*row) if row else None

    def open(self) -> list[SmsRow]:
        """The alarms still watched or due, in the order they were committed."""
        return [SmsRow(*row) for row in self._db.execute(
            f"{_SELECT} WHERE state IN ('watching', 'due') ORDER BY committed_at")]

    def recipients(self, event_ids: Iterable[str]) -> dict[str, dict[str, dict]]:
        """Each alarm's results so far, by number."""
        return {eid: json.loads(self._db.execute(
            "SELECT recipients FROM sms_notifications WHERE event_id = ?", (eid,)
        ).fetchone()[0] or "{}") for eid in event_ids}

    def results_sent_since(self, stamp: str) -> list[dict[str, dict]]:
        """The results of every row with an SMS sent at or after ``stamp`` (UTC)."""
        return [json.loads(raw) for (raw,) in self._db.execute(
            "SELECT recipients FROM sms_notifications WHERE sent_at >= ?", (stamp,))]

    # -- changes (inside the caller's transaction) ---------------------------------------

    def watch(self, event_id: str, *, committed_at: str, due_at: str, boot_id: str,
              due_mono: float, remaining_s: float) -> None:
        """Start watching an alarm (once: a second call for it changes nothing)."""
        self._db.execute(
            "INSERT OR IGNORE INTO sms_notifications(event_id, state, committed_at, due_at,"
            " attempts, recipients, boot_id, due_mono, remaining_s)"
            " VALUES (?, 'watching', ?, ?, 0, '{}', ?, ?, ?)",
            (event_id, committed_at, due_at, boot_id, due_mono, remaining_s))

    def restart_timer(self, event_id: str, *, boot_id: str, due_mono: float) -> None:
        """A new boot: the wait goes on from now, on this boot's monotonic clock."""
        self._db.execute("UPDATE sms_notifications SET boot_id = ?, due_mono = ?,"
                         " next_attempt_mono = NULL WHERE event_id = ?",
                         (boot_id, due_mono, event_id))

    def set_state(self, event_id: str, state: str, *, reason: str | None = None) -> None:
        if reason is None:
            self._db.execute("UPDATE sms_notifications SET state = ? WHERE event_id = ?",
                             (state, event_id))
        else:
            self._db.execute("UPDATE sms_notifications SET state = ?, reason = ?"
                             " WHERE event_id = ?", (state, reason, event_id))

    def add_reason(self, event_id: str, more: str) -> None:
        self._db.execute("UPDATE sms_notifications SET reason = coalesce(reason, '') || ?"
                         " WHERE event_id = ?", (more, event_id))

    def record(self, event_id: str, recipients: dict, *, text: str | None = None,
               sent_at: str | None = None, notice_event_id: str | None = None) -> None:
        """New results by number (and the text, the time of a sent SMS, or the
        ``fallback`` event that told the platform); what is None stays as it was."""
        self._db.execute(
            "UPDATE sms_notifications SET recipients = ?, text = coalesce(?, text),"
            " sent_at = coalesce(?, sent_at), notice_event_id = coalesce(?, notice_event_id)"
            " WHERE event_id = ?",
            (json.dumps(recipients, ensure_ascii=False), text, sent_at, notice_event_id,
             event_id))

    def count_attempt(self, event_ids: list[str]) -> None:
        self._db.execute("UPDATE sms_notifications SET attempts = attempts + 1 WHERE event_id"
                         f" IN ({','.join('?' * len(event_ids))})", event_ids)

    def plan_next_attempt(self, event_id: str, *, at: str, mono: float, boot_id: str) -> None:
        self._db.execute("UPDATE sms_notifications SET next_attempt_at = ?,"
                         " next_attempt_mono = ?, boot_id = ? WHERE event_id = ?",
                         (at, mono, boot_id, event_id))
