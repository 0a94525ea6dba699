"""The alarm latch (GB 50394 §5.2.3): latches once triggered, cleared only by a reset."""

from __future__ import annotations

import pytest

from edge.config import InputConfig
from edge.contract.events import ContactId, EventKind, Identity
from edge.daemons.button.latch import AlarmLatch, UnknownInput
from edge.store.outbox import Outbox

IDENTITY = Identity("test-school", "gate-1", "South gate")
INPUTS = {"gate": InputConfig(pin=17), "desk": InputConfig(pin=27, mode="silent")}


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "outbox.db"


@pytest.fixture
def latch(db_path):
    with Outbox(db_path, IDENTITY) as outbox:
        yield AlarmLatch(outbox, INPUTS, clock_synced=lambda: True)


def test_the_first_press_is_an_alarm_and_later_ones_are_repeats_of_it(latch):
    alarm = latch.press("gate")
    assert alarm.kind == EventKind.ALARM and alarm.draft.code == ContactId.PANIC
    assert alarm.draft.repeat_of is None
    repeats = [latch.press("gate") for _ in range(3)]
    assert [r.draft.repeat_of for r in repeats] == [alarm.id] * 3
    assert [r.draft.repeat for r in repeats] == [1, 2, 3]
    assert latch.latches()["gate"].repeats == 3
    assert latch.latches()["gate"].last_event_id == repeats[-1].id


def test_each_input_latches_on_its_own_with_its_own_code(latch):
    gate = latch.press("gate")
    desk = latch.press("desk")
    assert desk.draft.repeat_of is None and desk.draft.code == ContactId.SILENT_PANIC
    assert set(latch.latches()) == {"gate", "desk"}
    assert latch.press("gate").draft.repeat_of == gate.id


def test_a_reset_records_who_cleared_which_alarm_and_the_next_press_is_new(latch):
    alarm = latch.press("gate")
    latch.press("gate")
    [reset] = latch.reset(by="guard Wang")
    assert reset.kind == EventKind.RESET and reset.draft.code == ContactId.PANIC_RESET
    assert reset.draft.detail["alarm_id"] == alarm.id
    assert reset.draft.detail["by"] == "guard Wang" and reset.draft.detail["repeats"] == 1
    assert latch.latches() == {}
    assert latch.reset(by="guard Wang") == []  # nothing latched: nothing recorded
    assert latch.press("gate").draft.repeat_of is None


def test_reset_of_one_input_leaves_the_other_latched(latch):
    latch.press("gate")
    latch.press("desk")
    [reset] = latch.reset(by="cli", input_name="desk")
    assert reset.draft.input == "desk"
    assert set(latch.latches()) == {"gate"}
    with pytest.raises(UnknownInput):
        latch.reset(by="cli", input_name="nope")


def test_the_latch_survives_a_restart(db_path, latch):
    alarm = latch.press("gate")
    with Outbox(db_path, IDENTITY) as reopened:
        again = AlarmLatch(reopened, INPUTS).press("gate")
    assert again.draft.repeat_of == alarm.id


def test_a_failed_commit_leaves_neither_event_nor_latch(db_path, latch):
    with Outbox(db_path, IDENTITY) as outbox:
        outbox.db.execute("CREATE TRIGGER refuse BEFORE INSERT ON latches "
                          "BEGIN SELECT RAISE(ABORT, 'disk trouble'); END")
        with pytest.raises(Exception, match="disk trouble"):
            AlarmLatch(outbox, INPUTS).press("gate")
        assert outbox.db.execute("SELECT count(*) FROM events").fetchone()[0] == 0
        assert AlarmLatch(outbox, INPUTS).latches() == {}
