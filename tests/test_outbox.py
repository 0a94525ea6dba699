"""The outbox: durable, ordered, never forgetting an undelivered event (real SQLite files)."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from datetime import timedelta

import pytest

from edge.contract.events import ContactId, EventDraft, EventKind, Identity, Priority, utc_now
from edge.store.outbox import Outbox, OutboxError
from tests.support.contract import problems

IDENTITY = Identity("test-school", "gate-1", "South gate")


def draft(kind=EventKind.ALARM, code=ContactId.PANIC, **extra) -> EventDraft:
    return EventDraft(kind=kind, code=code, occurred_at=utc_now(), clock_synced=False,
                      boot_id="boot", input="gate", **extra)


@pytest.fixture
def outbox(tmp_path):
    with Outbox(tmp_path / "outbox.db", IDENTITY) as box:
        yield box


def test_every_commit_is_in_wal_mode_with_full_synchronous(outbox):
    conn = outbox.db
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_events_get_increasing_sequence_numbers_and_time_ordered_ids(outbox):
    events = [outbox.commit_event(draft()) for _ in range(50)]
    assert [e.seq for e in events] == list(range(1, 51))
    assert [e.id for e in events] == sorted(e.id for e in events)  # UUIDv7: time-ordered
    assert len({e.id for e in events}) == 50


def test_sequence_numbers_survive_restarts_and_never_go_back_after_pruning(tmp_path):
    path = tmp_path / "outbox.db"
    with Outbox(path, IDENTITY) as box:
        for _ in range(3):
            box.commit_event(draft(kind=EventKind.FAULT, code=ContactId.PANIC_ZONE_TROUBLE))
        box.mark_sent([1, 2, 3])
        # Everything delivered and old enough: pruning empties the table.
        assert box.prune(keep_days=1, now=utc_now() + timedelta(days=2)) == 3
        assert box.db.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    with Outbox(path, IDENTITY) as box:
        assert box.commit_event(draft()).seq == 4


def test_queued_rows_come_out_by_priority_then_sequence(outbox):
    outbox.commit_event(draft(kind=EventKind.FAULT, code=ContactId.PANIC_ZONE_TROUBLE))
    outbox.commit_event(draft(kind=EventKind.TEST, code=ContactId.MANUAL_TEST))
    outbox.commit_event(draft())
    outbox.commit_event(draft(kind=EventKind.FAULT, code=ContactId.PANIC_ZONE_TROUBLE))
    outbox.commit_event(draft())
    order = [(m.priority, m.seq) for m in outbox.next_queued(10)]
    assert order == [(Priority.ALARM, 3), (Priority.ALARM, 5), (Priority.TEST, 2),
                     (Priority.FAULT, 1), (Priority.FAULT, 4)]
    assert [m.seq for m in outbox.next_queued(2, exclude={3})] == [5, 2]


def test_rows_go_queued_sent_acknowledged_and_only_delivered_ones_are_pruned(outbox):
    alarm, unsent, fault = (outbox.commit_event(draft()), outbox.commit_event(draft()),
                            outbox.commit_event(draft(kind=EventKind.FAULT,
                                                      code=ContactId.PANIC_ZONE_TROUBLE)))
    assert outbox.mark_sent([alarm.seq, fault.seq]) == 2
    assert outbox.mark_sent([alarm.seq]) == 0  # already sent: idempotent
    later = utc_now() + timedelta(days=400)
    # A sent alarm still waits for the platform: kept, like the unsent one.
    assert outbox.prune(keep_days=90, now=later) == 1  # only the fault (no ack needed)
    [result] = outbox.mark_acknowledged([(alarm.id, utc_now(), "operator 7")])
    assert result.known and not result.already
    assert outbox.mark_acknowledged([(alarm.id, utc_now(), None)])[0].already
    assert not outbox.mark_acknowledged([("01234567-0000-7000-8000-000000000000",
                                          utc_now(), None)])[0].known
    assert outbox.prune(keep_days=90, now=later) == 1
    assert outbox.event_states([alarm.id, unsent.id]) == {unsent.id: "queued"}
    row = outbox.get_event_row(unsent.id)
    assert row["state"] == "queued"


def test_the_stored_payload_is_exactly_the_published_one_and_follows_the_schema(outbox):
    event = outbox.commit_event(draft(detail={"mode": "panic"}))
    [message] = outbox.next_queued(1)
    assert message.payload == event.payload(IDENTITY, outbox.epoch)
    import json

    from tests.support.device_keys import EVENT_SIGNER

    # Published with its device signature appended (the uplink signs as it publishes).
    assert problems("event", json.loads(EVENT_SIGNER.sign(message.payload))) == []
    body = json.loads(message.payload)
    assert body["seq"] == event.seq and body["id"] == event.id and body["location"] == "South gate"


def test_a_newer_schema_is_refused_not_damaged(tmp_path):
    path = tmp_path / "outbox.db"
    Outbox(path, IDENTITY).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(OutboxError, match="newer"):
        Outbox(path, IDENTITY)


def test_summary_counts_by_state_and_priority(outbox):
    for _ in range(3):
        outbox.commit_event(draft())
    outbox.commit_event(draft(kind=EventKind.TEST, code=ContactId.MANUAL_TEST))
    outbox.mark_sent([1])
    summary = outbox.summary()
    assert summary.counts == {"queued": {"alarm": 2, "test": 1}, "sent": {"alarm": 1}}
    assert summary.oldest_unsent_seq == 2 and summary.unsent == 3 and summary.last_seq == 4
    assert outbox.backlog()["queued"] == 3


def _commit_many(path: str, count: int) -> None:
    with Outbox(path, IDENTITY) as box:
        for _ in range(count):
            box.commit_event(draft())


def test_several_processes_committing_at_once_never_share_a_sequence_number(tmp_path):
    path = str(tmp_path / "outbox.db")
    Outbox(path, IDENTITY).close()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_commit_many, args=(path, 150)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    with Outbox(path, IDENTITY) as box:
        seqs = [row[0] for row in box.db.execute("SELECT seq FROM events ORDER BY seq")]
    assert seqs == list(range(1, 601))


def _open_at_once(path: str, go, results) -> None:
    go.wait()
    try:
        with Outbox(path, IDENTITY) as box:
            box.commit_event(draft())
        results.put("ok")
    except Exception as err:
        results.put(f"{type(err).__name__}: {err}")


def test_daemons_creating_the_database_at_the_same_moment_all_succeed(tmp_path):
    """First boot: several daemons open a database that does not exist yet, at once."""
    context = multiprocessing.get_context("fork")  # starts them closer together than spawn
    outcomes = []
    for attempt in range(25):
        go, results = context.Barrier(6), context.Queue()
        workers = [context.Process(target=_open_at_once,
                                   args=(str(tmp_path / f"fresh-{attempt}.db"), go, results))
                   for _ in range(6)]
        for worker in workers:
            worker.start()
        outcomes += [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(60)
    assert [o for o in outcomes if o != "ok"] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root creates files for another user")
def test_root_opening_the_outbox_first_leaves_it_usable_by_the_daemons(tmp_path):
    """An installer runs `guardpost queue` as root before the daemons ever ran."""
    state = tmp_path / "var-lib-guardpost"
    state.mkdir()
    os.chown(state, 65534, 65534)  # the daemons' user owns its state directory
    with Outbox(state / "outbox.db", IDENTITY) as box:
        box.commit_event(draft())
    owners = {p.name: (p.stat().st_uid, p.stat().st_gid) for p in state.iterdir()}
    assert owners and set(owners.values()) == {(65534, 65534)}, owners


def test_ids_follow_the_newest_in_the_outbox_whoever_made_it(monkeypatch):
    """After the wall clock stepped back, another process's ids still come after the
    newest one (the outbox shows it to every writer before they make theirs)."""
    from edge.store import event_ids

    later = event_ids.event_id(1, unix_ns=2_000_000_000_000_000_000)
    monkeypatch.setattr(event_ids, "_last_prefix", 0)   # a fresh process
    event_ids.follow(later)
    earlier_clock = event_ids.event_id(2, unix_ns=1_000_000_000_000_000_000)
    assert earlier_clock > later and event_ids.seq_of(earlier_clock) == 2


def test_delivered_rows_stamped_by_a_clock_far_ahead_are_pruned_too(tmp_path):
    with Outbox(tmp_path / "outbox.db", IDENTITY) as box:
        ahead = box.commit_event(draft(kind=EventKind.FAULT, code=ContactId.PANIC_ZONE_TROUBLE))
        queued = box.commit_event(draft(kind=EventKind.FAULT, code=ContactId.PANIC_ZONE_TROUBLE))
        box.mark_sent([ahead.seq])
        # As if committed while the wall clock said 2099.
        box.db.execute("UPDATE events SET committed_at = '2099-01-01T00:00:00.000000Z'")
        assert box.prune(keep_days=90) == 1
        assert box.event(ahead.id) is None and box.event(queued.id) is not None
