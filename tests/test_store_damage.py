"""The outbox when its file is lost, cut short, damaged, or its disk full (real SQLite files,
real file systems mounted by the test).

Each case is judged on what the platform would see: the sequence never repeats or goes
back, a new epoch and a fault event say when history was lost, and what can still be read
of a damaged file comes back with its own id and bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import pytest

from edge.contract.events import ContactId, EventKind
from edge.store import salvage
from edge.store.outbox import DiskFull, Outbox, OutboxDamaged, OutboxReplaced
from edge.store.reserve import MIB, SpaceReserve, alarms_per_reserve
from edge.store.watermark import SLOT, Mark, SequenceMark
from tests.support.disk import damage, fill, free_bytes, small_disk
from tests.test_outbox import IDENTITY, draft


def payloads(path) -> list[dict]:
    db = sqlite3.connect(path)
    try:
        return [json.loads(p) for (p,) in db.execute("SELECT payload FROM events ORDER BY seq")]
    finally:
        db.close()


def history_faults(box: Outbox) -> list[dict]:
    return [json.loads(r.payload) for r in box.events_after(0, ["fault"])
            if json.loads(r.payload)["detail"].get("problem") == "history_lost"]


# -- the mark file -------------------------------------------------------------------------

def test_the_mark_keeps_the_larger_value_when_a_slot_is_torn(tmp_path):
    mark = SequenceMark(tmp_path / "m")
    mark.write(Mark(10, 1, "e"))
    mark.write(Mark(11, 1, "e"))
    mark.close()
    assert SequenceMark(tmp_path / "m").read() == Mark(11, 1, "e")
    # Tear the slot that holds 11: the other still holds 10.
    raw = (tmp_path / "m").read_bytes()
    torn_slot = 0 if b" 11 " in raw[:SLOT] else 1
    damage(tmp_path / "m", torn_slot * SLOT + 12, 4, byte=0x30)
    assert SequenceMark(tmp_path / "m").read() == Mark(10, 1, "e")


def test_the_mark_never_goes_back_within_an_epoch(tmp_path):
    mark = SequenceMark(tmp_path / "m")
    mark.write(Mark(50, 3, "e"))
    mark.write(Mark(40, 2, "e"))  # a slower process writing what it saw
    assert mark.read() == Mark(50, 3, "e")
    mark.close()


# -- history lost ---------------------------------------------------------------------------

def test_a_lost_wal_starts_a_new_epoch_above_the_lost_numbers(tmp_path):
    live, kept = tmp_path / "live", tmp_path / "kept"
    with Outbox(live / "outbox.db", IDENTITY, checkpoint=False) as box:
        epoch = box.epoch
        for _ in range(2):
            box.commit_event(draft())
        box.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for _ in range(3):
            box.commit_event(draft())  # in the WAL only
        # The card loses the WAL: the database file and the mark are what is left.
        kept.mkdir()
        shutil.copy(live / "outbox.db", kept / "outbox.db")
        shutil.copy(live / "outbox.db.mark", kept / "outbox.db.mark")
    with Outbox(kept / "outbox.db", IDENTITY) as box:
        assert box.epoch != epoch
        [fault] = history_faults(box)
        assert fault["seq"] == 6 and fault["epoch"] == box.epoch
        assert fault["detail"] | {"reason": None} == {
            "check": "outbox", "problem": "history_lost", "reason": None,
            "previous_epoch": epoch, "last_seq_before": 5, "last_seq_kept": 2,
            "lost_from_seq": 3, "lost_to_seq": 5}
        assert fault["code"] == ContactId.FAILURE_TO_COMMUNICATE
        assert box.commit_event(draft()).seq == 7
    with Outbox(kept / "outbox.db", IDENTITY) as box:  # once only
        assert len(history_faults(box)) == 1


def test_a_database_cut_to_nothing_does_not_restart_the_sequence(tmp_path):
    path = tmp_path / "outbox.db"
    with Outbox(path, IDENTITY) as box:
        epoch = box.epoch
        for _ in range(4):
            box.commit_event(draft())
    os.truncate(path, 0)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"outbox.db{suffix}").unlink(missing_ok=True)
    with Outbox(path, IDENTITY) as box:
        [fault] = history_faults(box)
        assert fault["seq"] == 5 and fault["detail"]["previous_epoch"] == epoch
        assert fault["detail"]["lost_from_seq"] == 1 and fault["detail"]["lost_to_seq"] == 4
        assert box.commit_event(draft()).seq == 6


def test_every_event_names_the_epoch_and_a_first_start_loses_nothing(tmp_path):
    with Outbox(tmp_path / "outbox.db", IDENTITY) as box:
        event = box.commit_event(draft())
        assert json.loads(box.event(event.id).payload)["epoch"] == box.epoch
        assert history_faults(box) == []


# -- a damaged file ---------------------------------------------------------------------------

def _committed(path, count: int) -> list[str]:
    with Outbox(path, IDENTITY) as box:
        return [box.commit_event(draft()).id for _ in range(count)]


def test_a_header_overwritten_is_moved_aside_and_its_events_come_back_byte_for_byte(tmp_path):
    path = tmp_path / "outbox.db"
    ids = _committed(path, 30)
    before = {p["id"]: p for p in payloads(path)}
    raw_before = {json.loads(p)["id"]: p for (p,) in
                  sqlite3.connect(path).execute("SELECT payload FROM events")}
    damage(path, 0, 100)
    with Outbox(path, IDENTITY) as box:
        [aside] = salvage.pending(path)
        assert aside.exists()
        [fault] = history_faults(box)
        assert "not a database" in fault["detail"]["reason"] or "malformed" in \
            fault["detail"]["reason"]
        assert box.commit_event(draft()).seq > 30   # armed at once, above the old numbers
        summary = salvage.salvage(box, aside, keep_days=90)
        assert summary["inserted"] == 30 and summary["by_bytes"] == 30
        assert salvage.pending(path) == []
        for eid in ids:
            row = box.event(eid)
            assert row.payload == raw_before[eid] and json.loads(row.payload) == before[eid]
            assert row.state == "queued"
        assert box.db.execute("SELECT count(*) FROM events WHERE recovered_from = ?",
                              (aside.name,)).fetchone()[0] == 30


def _events_root_page(path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'events'").fetchone()[0]
    finally:
        db.close()


def test_a_bad_page_met_by_a_write_moves_the_file_aside_and_the_write_goes_into_a_new_one(
        tmp_path):
    path = tmp_path / "outbox.db"
    _committed(path, 200)
    root = _events_root_page(path)
    with Outbox(path, IDENTITY) as other:   # open before the damage, as a running daemon is
        damage(path, (root - 1) * 4096, 4096)
        with Outbox(path, IDENTITY) as box:
            with pytest.raises(OutboxReplaced):
                box.commit_event(draft())
            event = box.commit_event(draft())   # tried again: into the new file
            assert event.seq > 200
            followed = other.commit_event(draft())  # the other follows to the new file
            assert followed.seq == event.seq + 1
        aside = salvage.pending(path)[0]
    with Outbox(path, IDENTITY) as box:
        assert {event.id, followed.id} <= {p["id"] for p in payloads(path)}
        summary = salvage.salvage(box, aside, keep_days=90)
        assert summary["events"] == 200


def test_a_connection_to_a_file_moved_aside_does_not_delete_the_new_ones_wal(tmp_path):
    path = tmp_path / "outbox.db"
    _committed(path, 5)
    stale = Outbox(path, IDENTITY)   # a daemon that never writes, opened before
    with Outbox(path, IDENTITY) as box:
        box.repair("a test says so")
    writer = Outbox(path, IDENTITY, checkpoint=False)
    kept = writer.commit_event(draft())  # in the new file's WAL only
    stale.close()                         # the last connection to the old file
    assert (tmp_path / "outbox.db-wal").exists()
    writer.db.execute("SELECT 1").fetchone()
    with Outbox(path, IDENTITY) as reader:
        assert reader.event(kept.id) is not None
    writer.close()


def test_tools_that_only_look_say_the_outbox_is_damaged(tmp_path):
    path = tmp_path / "outbox.db"
    _committed(path, 3)
    damage(path, 0, 100)
    with pytest.raises(OutboxDamaged, match="damaged"):
        Outbox(path, IDENTITY, repair=False)
    assert salvage.pending(path) == []   # and nothing was moved


# -- a full disk ----------------------------------------------------------------------------

@pytest.fixture
def full_disk(tmp_path):
    with small_disk(tmp_path / "card", 8 * 1024) as card:
        yield card


def test_alarms_are_recorded_on_a_full_disk_from_the_reserve_and_nothing_else_is(full_disk):
    path = full_disk / "outbox.db"
    _committed(path, 3)
    reserve = SpaceReserve(path, 2 * MIB)
    assert reserve.fill(margin=0)
    filler = fill(full_disk)
    assert free_bytes(full_disk) == 0
    # Any daemon may open (a step of the reserve for SQLite's index), but only the alarm
    # path writes from it: what can wait, waits.
    with Outbox(path, IDENTITY) as other:
        with pytest.raises(DiskFull) as refused:
            while True:
                other.commit_event(draft(kind=EventKind.FAULT, code=ContactId.SYSTEM_TROUBLE))
        assert refused.value.released == 0
    recorded = 0
    with Outbox(path, IDENTITY, checkpoint=False, alarm_path=True) as box:
        while True:
            try:
                box.commit_event(draft())
                recorded += 1
            except DiskFull as err:
                if not err.released:
                    break
    assert reserve.held() == 0
    print(f"alarms recorded from a 2 MB reserve: {recorded}")
    assert recorded >= alarms_per_reserve(2 * MIB)
    # Space comes back: everything is there, and the reserve fills again.
    filler.unlink()
    with Outbox(path, IDENTITY) as box:
        alarms = box.events_after(3, [EventKind.ALARM.value])
        assert len(alarms) == recorded and box.last_seq() == alarms[-1].seq
    assert reserve.fill()
