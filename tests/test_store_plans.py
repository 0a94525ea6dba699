"""No hot query scans the events: every query of the heartbeat, the queue, the uplink's
walk, acknowledgements, the button's latch and LED, the fallback's loop and the alarm
test's polling is an index search, checked on an outbox of one million events."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta

import pytest

from edge.config import InputConfig
from edge.contract.events import ContactId, EventDraft, EventKind, Identity, utc_now
from edge.daemons.button.latch import AlarmLatch
from edge.store.outbox import Outbox
from tests.support.outbox_fill import fill

IDENTITY = Identity("test-school", "gate-1", "South gate")
DEPTH = 1_000_000


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Outbox:
    path = tmp_path_factory.mktemp("deep") / "outbox.db"
    fill(path, IDENTITY, DEPTH, queued=2000)
    with Outbox(path, IDENTITY) as outbox:
        outbox.db.execute("ANALYZE")  # as a long-lived device's would be, or not: either way
        yield outbox


def statements(outbox: Outbox, work: Callable[[], object]) -> list[str]:
    """Every statement ``work`` ran on this connection, with its values filled in."""
    ran: list[str] = []
    outbox.db.set_trace_callback(ran.append)
    try:
        work()
    finally:
        outbox.db.set_trace_callback(None)
    return [sql for sql in ran if re.search(r"\bevents\b", sql)]


def plans(outbox: Outbox, work: Callable[[], object]) -> dict[str, list[str]]:
    ran = statements(outbox, work)
    assert ran, "the work ran no query on the events"
    return {sql: [row[3] for row in outbox.db.execute(f"EXPLAIN QUERY PLAN {sql}")]
            for sql in ran}


def assert_no_scan(outbox: Outbox, work: Callable[[], object]) -> None:
    found = plans(outbox, work)
    scans = {sql: plan for sql, plan in found.items()
             if any(re.match(r"SCAN (events|e)\b", step) for step in plan)}
    assert scans == {}, scans


def alarm() -> EventDraft:
    return EventDraft(kind=EventKind.ALARM, code=ContactId.PANIC, occurred_at=utc_now(),
                      clock_synced=True, boot_id="boot", input="gate")


def test_the_heartbeat_and_guardpost_queue_count_without_a_scan(deep):
    assert_no_scan(deep, deep.backlog)
    assert_no_scan(deep, deep.summary)
    backlog = deep.backlog()
    assert backlog["queued"] == 2000 and backlog["last_seq"] >= DEPTH


def test_the_uplinks_walk_of_the_queue_is_index_searches(deep):
    assert_no_scan(deep, lambda: deep.next_queued(20))
    first = deep.next_queued(1)[0]
    assert_no_scan(deep, lambda: deep.queued_after(first.priority, first.seq, 20))
    assert_no_scan(deep, lambda: deep.mark_sent([first.seq]))


def test_acknowledgements_and_state_lookups_find_their_row_by_key(deep):
    event = deep.commit_event(alarm())
    assert_no_scan(deep, lambda: deep.event_states([event.id]))
    assert_no_scan(deep, lambda: deep.event(event.id))  # the alarm test's polling
    assert_no_scan(deep, lambda: deep.mark_acknowledged([(event.id, utc_now(), "op")]))
    assert deep.event(event.id).state == "acknowledged"


def test_the_buttons_latch_and_led_queries_search(deep):
    latch = AlarmLatch(deep, {"gate": InputConfig(pin=17)})
    latch.press("gate")
    assert_no_scan(deep, lambda: latch.press("gate"))
    assert_no_scan(deep, lambda: deep.event_states(
        [lt.last_event_id for lt in latch.latches().values()]))
    latch.reset("test")


def test_the_fallback_and_camera_follow_new_events_by_key(deep):
    last = deep.last_seq()
    deep.commit_event(alarm())
    assert_no_scan(deep, lambda: deep.events_after(last, ("alarm",)))
    assert_no_scan(deep, lambda: deep.events_after(last, ("alarm", "test")))
    assert_no_scan(deep, lambda: deep.oldest_open_alarm_since(utc_now() - timedelta(hours=1)))


def test_the_prune_finds_its_rows_through_an_index_and_deletes_in_batches(deep):
    found = plans(deep, lambda: deep.prune(keep_days=99))
    deletes = [sql for sql in found if sql.startswith("DELETE")]
    assert len(deletes) > 1  # batches, each its own transaction
    for sql in deletes:
        assert any("USING INDEX events_prunable" in step for step in found[sql]), found[sql]


def test_the_counts_stay_exact_at_a_million_rows(deep):
    counts = {}
    for state, priority, ack_required, count in deep.db.execute(
            "SELECT state, priority, ack_required, count(*) FROM events"
            " GROUP BY state, priority, ack_required"):
        counts[f"events/{state}/{priority}/{ack_required}"] = count
    kept = dict(deep.db.execute("SELECT name, value FROM counters WHERE name LIKE 'events/%'"
                                " AND value != 0"))
    assert kept == counts


def test_the_replay_checks_search_their_index_among_many_nonces(deep):
    """The nonces kept are few (those of the last 40 s), but a platform clock pushed far
    ahead, or a flood of messages, must not turn the replay check into a scan."""
    from edge.contract.messages import SIGNED_PAST

    now = utc_now()
    with deep.transaction():
        deep.db.executemany(
            "INSERT INTO accepted_nonces (nonce, key_id, signed_at) VALUES (?, ?, ?)",
            ((f"n{n:07d}", f"key-{n % 4}", (now + timedelta(microseconds=n)).isoformat())
             for n in range(200_000)))
    deep.db.execute("ANALYZE accepted_nonces")
    ran: list[str] = []
    deep.db.set_trace_callback(ran.append)
    try:
        assert deep.nonces.seen(["n0000001", "absent"]) == {"n0000001"}
        keys = [f"key-{n}" for n in range(4)]
        assert len(deep.nonces.newest(keys)) == 4
        with deep.transaction():
            deep.nonces.prune(keys, SIGNED_PAST)
    finally:
        deep.db.set_trace_callback(None)
    queries = [sql for sql in ran if "accepted_nonces" in sql]
    assert len(queries) >= 4
    for sql in queries:
        plan = [row[3] for row in deep.db.execute(f"EXPLAIN QUERY PLAN {sql}")]
        assert not any(step.startswith("SCAN") for step in plan), (sql, plan)
