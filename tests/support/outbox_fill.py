"""A deep outbox, built fast: one bulk insert in one transaction, a realistic mix.

Used by the query-plan tests and ``bench/outbox.py``. Rows spread over ``days`` of
history, oldest first: most delivered (health and faults sent, alarms and tests
acknowledged), some alarms and tests sent and still waiting for the platform, and the
newest ``queued`` rows a backlog of every priority.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge.contract.events import Identity, utc_now
from edge.store.event_ids import event_id
from edge.store.outbox import Outbox


def fill(path: str | Path, identity: Identity, rows: int, *, queued: int = 1000,
         days: int = 100) -> None:
    """Append ``rows`` events to the outbox at ``path`` (created if need be)."""
    with Outbox(path, identity) as outbox:
        conn = outbox.db
        conn.create_function("event_id", 1, event_id, deterministic=False)
        start = outbox.last_seq()
        now = utc_now().timestamp()
        payload = json.dumps({"schema": "guardpost/event@1", "detail": {"fill": "x" * 150}})
        with outbox.transaction(timeout=60):
            conn.execute(
                """
                WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?),
                -- of every 20 rows: 1 alarm, 1 test, 3 faults and restores, 15 health
                mix(m, kind, code, priority, ack_required) AS (VALUES
                    (0, 'alarm', 120, 0, 1), (1, 'test', 602, 1, 1), (2, 'fault', 375, 2, 0),
                    (3, 'fault', 375, 2, 0), (4, 'restore', 375, 2, 0))
                INSERT INTO events(seq, id, kind, code, priority, input, occurred_at,
                                   committed_at, clock_synced, boot_id, repeat_of, ack_required,
                                   topic, payload, state, sent_at, acknowledged_at)
                SELECT ? + i, event_id(? + i), coalesce(kind, 'health'), coalesce(code, 602),
                       coalesce(priority, 4), 'gate', stamp, stamp, 1, 'boot', NULL,
                       coalesce(ack_required, 0), 'event/' || coalesce(kind, 'health'), ?,
                       CASE WHEN i > ? - ? THEN 'queued'
                            WHEN coalesce(ack_required, 0) = 0 THEN 'sent'
                            WHEN i % 7 = 0 THEN 'sent' ELSE 'acknowledged' END,
                       CASE WHEN i > ? - ? THEN NULL ELSE stamp END,
                       CASE WHEN i > ? - ? OR coalesce(ack_required, 0) = 0 OR i % 7 = 0
                            THEN NULL ELSE stamp END
                FROM (SELECT i, strftime('%Y-%m-%dT%H:%M:%f000Z',
                                         ? - ? * 86400.0 * (? - i) / ?, 'unixepoch') AS stamp
                      FROM n)
                LEFT JOIN mix ON mix.m = i % 20
                """,
                (rows, start, start, payload.encode(), rows, queued, rows, queued, rows, queued,
                 now, days, rows, rows))
            conn.execute("UPDATE counters SET value = ? WHERE name = 'event_seq'",
                         (start + rows,))
