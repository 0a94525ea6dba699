"""The device on a full disk, a damaged outbox, a lost WAL and a clean stop it cannot
commit through: real daemons, a real Mosquitto, real files on a file system the test mounts.

Each story is judged where the police are: every alarm the device said it recorded
arrives (by id, byte for byte where it was published before), and the sequence numbers
the platform sees never repeat.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from edge.contract.events import ContactId, EventDraft, EventKind, utc_now
from edge.runtime.control import request
from edge.store import salvage
from edge.store.outbox import Outbox
from edge.store.reserve import MIB, SpaceReserve
from tests.support.daemons import poll_until
from tests.support.device_keys import EVENT_SIGNER
from tests.support.disk import damage, fill, free_bytes, small_disk
from tests.test_alarm_path import press


@pytest.fixture
def card(tmp_path):
    """The state directory on a 24 MB SD card of its own."""
    with small_disk(tmp_path / "card", 24 * 1024) as mounted:
        yield mounted


def on_card(card, **more) -> dict:
    return {"storage": {"database": str(card / "outbox.db"), "spool_dir": str(card / "spool"),
                        "alarm_reserve_mb": 2, **more}}


def arrived(police, ids) -> dict:
    """The events with these ids, as the platform has them (first copies), once all came."""
    ids = set(ids)
    return police.wait_for(
        lambda p: (lambda got: got if set(got) == ids else None)(
            {e["id"]: e for e in p.events() if e["id"] in ids}),
        timeout=30, what=f"{len(ids)} event(s) at the platform")


def raw_copies(police, event_id) -> set[bytes]:
    return {m.payload for m in police.messages
            if m.leaf.startswith("event/") and isinstance(m.body, dict)
            and m.body.get("id") == event_id}


def test_on_a_full_disk_the_button_starts_records_alarms_and_the_backlog_is_delivered(
        card, make_config, daemons, platform):
    path, config = make_config(**on_card(card), health={
        "interval_s": 5, "restore_after": 1, "min_free_mb": 1})
    police = platform(config, ack=True)
    button = daemons("button", path)
    backlog = [press(config)["id"] for _ in range(3)]   # no uplink yet: they wait
    button.stop()
    assert SpaceReserve(config.storage.database, 2 * MIB).fill(margin=0)
    filler = fill(card)
    assert free_bytes(card) == 0

    # Both daemons start on a disk with not one byte free, and the alarms go through.
    daemons("button", path)
    daemons("uplink", path)
    fresh = [press(config)["id"] for _ in range(5)]
    got = arrived(police, backlog + fresh)
    police.wait_for(lambda p: set(backlog + fresh) <= set(p.acked), what="acknowledgements")
    seqs = [got[i]["seq"] for i in backlog + fresh]
    assert seqs == sorted(seqs) and len(set(seqs)) == 8
    # The LED and `guardpost status` say the disk is full.
    poll_until(lambda: request(config.storage.runtime_dir / "button.ctl",
                               {"op": "status"})["led"] in ("fault", "fast-blink", "slow-blink",
                                                          "steady"), what="the LED")
    with Outbox(config.storage.database, config.identity, repair=False) as outbox:
        from edge.tools.status import storage_status
        assert storage_status(config, outbox)["disk_full"]

    # The self-test reports the full disk at its first run, not after its hysteresis.
    daemons("selftest", path)
    [fault] = police.wait_for(lambda p: [e for e in p.events("fault")
                                         if e["detail"].get("check") == "disk"],
                              what="the disk fault")
    assert fault["code"] == ContactId.SYSTEM_TROUBLE and "disk full" in \
        fault["detail"]["summary"]
    # Space comes back: the self-test fills the reserve again and sends the restore;
    # nothing was lost.
    filler.unlink()
    [restore] = police.wait_for(lambda p: [e for e in p.events("restore")
                                           if e["detail"].get("check") == "disk"],
                                timeout=60, what="the disk restore")
    assert restore["code"] == fault["code"]
    assert SpaceReserve(config.storage.database, 2 * MIB).short() == 0
    assert set(backlog + fresh) <= {e["id"] for e in police.events("alarm")}


@pytest.mark.parametrize("how", ["header", "cut in half", "events page", "index page"])
def test_a_damaged_outbox_at_start_is_moved_aside_alarms_work_and_its_events_come_back(
        how, tmp_path, make_config, daemons, platform):
    path, config = make_config()
    database = config.storage.database
    button = daemons("button", path)
    before = [press(config)["id"] for _ in range(6)]   # queued: no uplink yet
    button.stop()
    with Outbox(database, config.identity) as outbox:
        # As recorded, signed as the uplink publishes it (deterministic: the same bytes).
        published = {i: EVENT_SIGNER.sign(outbox.event(i).payload) for i in before}
        if how == "cut in half":
            # Later events fill the second half (what is cut off is gone for good).
            outbox.commit_events([EventDraft(
                kind=EventKind.FAULT, code=ContactId.SYSTEM_TROUBLE, occurred_at=utc_now(),
                clock_synced=False, boot_id="b", detail={"check": "filler"})] * 600)
        outbox.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        root = outbox.db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?",
            ("events_queue" if how == "index page" else "events",)).fetchone()[0]
    if how == "header":
        damage(database, 0, 100)
        # The tools that only look say so in a sentence, and move nothing.
        for command in ("status", "queue"):
            done = subprocess.run([sys.executable, "-m", "edge", command, "--config",
                                   str(path)], capture_output=True, text=True, timeout=60)
            assert done.returncode == 1 and "the outbox cannot be read" in done.stderr
            assert "Traceback" not in done.stderr
        assert salvage.pending(database) == []
    elif how == "cut in half":
        os.truncate(database, os.path.getsize(database) // 2)
    else:
        damage(database, (root - 1) * 4096, 4096)

    police = platform(config, ack=True)
    daemons("button", path)
    daemons("uplink", path)
    daemons("selftest", path)
    fresh = press(config)
    assert fresh["seq"] > (606 if how == "cut in half" else 6)  # above every number given
    got = arrived(police, [*before, fresh["id"]])
    # What was read back is the same bytes as it was recorded.
    for event_id in before:
        assert raw_copies(police, event_id) == {published[event_id]}
        [copy] = [m for m in police.messages if isinstance(m.body, dict)
                  and m.body.get("id") == event_id][:1]
        assert ("recovered", "true") in (getattr(copy.properties, "UserProperty", []) or [])
    fresh_copy = next(m for m in police.messages if isinstance(m.body, dict)
                      and m.body.get("id") == fresh["id"])
    fresh_user = dict(getattr(fresh_copy.properties, "UserProperty", None) or [])
    assert "recovered" not in fresh_user and "waited_ms" in fresh_user
    [lost] = police.wait_for(lambda p: [e for e in p.events("fault")
                                        if e["detail"].get("problem") == "history_lost"],
                             what="the fault that says history was lost")
    assert lost["code"] == ContactId.FAILURE_TO_COMMUNICATE
    [recovered] = police.wait_for(lambda p: [e for e in p.events("restore")
                                             if e["detail"].get("problem") == "recovered"],
                                  what="the restore that says what came back")
    assert recovered["detail"]["events"] >= 6
    assert got[fresh["id"]]["epoch"] == lost["epoch"] != lost["detail"]["previous_epoch"]
    assert salvage.pending(database) == []
    assert list(database.parent.glob("outbox.db.damaged-*"))   # kept for inspection


def test_a_lost_wal_is_told_to_the_platform_and_numbers_never_repeat(
        tmp_path, make_config, daemons, platform):
    path, config = make_config()
    database = config.storage.database
    police = platform(config, ack=True)
    button = daemons("button", path)
    uplink = daemons("uplink", path)
    first = [press(config) for _ in range(3)]
    arrived(police, [e["id"] for e in first])
    uplink.stop()
    lost = [press(config) for _ in range(4)]  # in the WAL: the button never checkpoints
    button.kill()
    os.unlink(f"{database}-wal")

    daemons("button", path)
    daemons("uplink", path)
    after = press(config)
    assert after["seq"] > max(e["seq"] for e in lost)
    [fault] = police.wait_for(lambda p: [e for e in p.events("fault")
                                         if e["detail"].get("problem") == "history_lost"],
                              what="the fault that says history was lost")
    assert fault["detail"]["lost_to_seq"] == max(e["seq"] for e in lost)
    seqs = [e["seq"] for e in police.events()]
    assert len(seqs) == len(set(seqs))


def test_presses_the_disk_refuses_survive_a_clean_stop(card, make_config, daemons, platform):
    path, config = make_config(**on_card(card))
    button = daemons("button", path)
    press(config)
    SpaceReserve(config.storage.database, 2 * MIB).path.unlink(missing_ok=True)  # none left
    filler = fill(card)
    runtime = config.storage.runtime_dir
    reply = request(runtime / "button.ctl", {"op": "press", "input": "gate", "hold": 0.05},
                    timeout=30)
    assert not reply.get("accepted"), reply  # not decided in time: the disk refuses
    poll_until(lambda: request(runtime / "button.ctl", {"op": "status"})
               ["unrecorded_presses"] == 1, what="the press waiting in memory")
    button.process.send_signal(signal.SIGTERM)
    assert button.process.wait(30) == 0
    assert "KEPT FOR THE NEXT START" in button.log()

    filler.unlink()
    police = platform(config, ack=True)
    daemons("button", path)
    daemons("uplink", path)
    [kept] = police.wait_for(lambda p: [e for e in p.events("alarm") if e["seq"] >= 2],
                             what="the press kept across the stop")
    assert kept["input"] == "gate"


class Presser:
    """Presses the gate button over and over from a thread; keeps what the device said
    it recorded (durably: the reply comes after the commit)."""

    def __init__(self, config):
        self.config = config
        self.confirmed: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                reply = request(self.config.storage.runtime_dir / "button.ctl",
                                {"op": "press", "input": "gate", "hold": 0.02}, timeout=5)
            except (OSError, ValueError):
                continue
            if reply.get("ok") and reply.get("accepted"):
                self.confirmed.append(reply["event"])


@pytest.mark.parametrize("cut", range(3))
def test_a_power_cut_at_any_moment_loses_nothing_committed(cut, tmp_path, make_config,
                                                           daemons, platform, broker):
    """Every process frozen at once (SIGSTOP), the files copied as they are at that
    instant, then killed: a device started from the copy delivers every alarm it had
    confirmed, and its schema is whole. (The page cache survives a SIGKILL, not a power
    cut: what this proves is that the files are consistent at every instant; that what
    was not yet fsynced may be lost is SQLite's synchronous=FULL to keep.)"""
    path, config = make_config()
    police = platform(config, ack=True)
    running = [daemons("button", path), daemons("uplink", path)]
    presser = Presser(config)
    presser.thread.start()
    poll_until(lambda: len(presser.confirmed) >= 3 + 2 * cut, timeout=30,
               what="a few presses recorded")
    for process in running:
        process.process.send_signal(signal.SIGSTOP)
    confirmed = list(presser.confirmed)
    copy = tmp_path / "after-the-cut"
    copy.mkdir()
    state = config.storage.database.parent
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm", "outbox.db.mark"):
        if (state / name).exists():
            shutil.copy2(state / name, copy / name)
    for process in running:
        process.process.kill()
        process.process.wait(10)
    presser.stop.set()
    presser.thread.join(10)

    path2, config2 = make_config("after.toml", storage={
        "database": str(copy / "outbox.db"), "runtime_dir": str(tmp_path / "run2"),
        "spool_dir": str(copy / "spool")})
    with Outbox(config2.storage.database, config2.identity) as outbox:
        assert outbox.integrity_check() == ["ok"]
    daemons("button", path2)
    daemons("uplink", path2)
    arrived(police, [e["id"] for e in confirmed])
    after = press(config2)
    assert after["seq"] > max(e["seq"] for e in confirmed)
