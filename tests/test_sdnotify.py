"""The systemd protocol as the units use it: READY=1 when really ready, a watchdog fed by
the main loop, and no feeding when that loop is stuck."""

from __future__ import annotations

import fcntl
import itertools

from edge.contract.events import EventDraft, EventKind, utc_now
from edge.runtime.control import request
from edge.runtime.wake import wake, wake_path
from edge.store.outbox import Outbox
from tests.support.daemons import DaemonProcess, poll_until

WATCHDOG_USEC = 2_000_000  # systemd would restart a daemon silent for 2 s
WATCHDOG_S = WATCHDOG_USEC / 1e6


def pings(listener, pid: int) -> list[float]:
    return [t for t, sender, field in listener.history if sender == pid and field == "WATCHDOG=1"]


def more_pings(listener, pid: int, count: int, timeout: float = 20.0) -> list[float]:
    """Wait (on the notify socket) for ``count`` more pings; return them."""
    start = len(pings(listener, pid))
    assert listener.wait_until(lambda notes: len(pings(notes, pid)) >= start + count, timeout), \
        f"fewer than {count} watchdog pings in {timeout} s"
    return pings(listener, pid)[start:]


def test_ready_means_ready_and_the_main_loops_feed_the_watchdog(make_config, listener):
    path, config = make_config()
    env = {"WATCHDOG_USEC": str(WATCHDOG_USEC)}
    button = DaemonProcess("button", path, listener, extra_env=env).start()
    uplink = DaemonProcess("uplink", path, listener, extra_env=env).start()
    try:
        # READY=1 came only once each could do its job: the button answers on its socket
        # with its outbox open; the uplink's wake-up socket is bound.
        assert request(config.storage.runtime_dir / "button.ctl", {"op": "ping"}) == {"ok": True}
        assert config.storage.database.exists()
        assert wake_path(config.storage.runtime_dir, "uplink").exists()
        for daemon in (button, uplink):
            fed = more_pings(listener, daemon.pid, 4)
            gaps = [later - earlier for earlier, later in itertools.pairwise(fed)]
            # Fed about every half timeout: never as late as the timeout itself.
            assert all(gap < WATCHDOG_S for gap in gaps), gaps
    finally:
        button.stop()
        uplink.stop()


def test_a_loop_that_meets_a_held_database_lock_waits_within_bounds_and_feeds_the_watchdog(
        make_config, listener, platform):
    """Another writer hangs holding the outbox's write lock. The uplink used to block on it
    (and be restarted by the watchdog with the alarm's PUBACK unrecorded); its waits are
    bounded now: it keeps feeding the watchdog, tries again, and records the alarm as sent
    once the lock is free."""
    path, config = make_config()
    platform(config)  # a subscriber: without one a PUBACK says nobody took the alarm
    uplink = DaemonProcess("uplink", path, listener,
                           extra_env={"WATCHDOG_USEC": str(WATCHDOG_USEC)}).start()
    try:
        uplink.wait_for_line("connected to")
        more_pings(listener, uplink.pid, 2)
        with Outbox(config.storage.database, config.identity) as outbox, \
                open(f"{config.storage.database}.writelock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another writer hangs, holding the lock
            try:
                seq = _commit_alarm_bypassing_the_lock(outbox)
                wake(config.storage.runtime_dir, "uplink")
                uplink.wait_for_line("another writer held the outbox")  # a bound ran out
                fed = more_pings(listener, uplink.pid, 3)
                gaps = [later - earlier for earlier, later in itertools.pairwise(fed)]
                assert all(gap < WATCHDOG_S for gap in gaps), gaps
                assert outbox.db.execute("SELECT state FROM events WHERE seq = ?",
                                         (seq,)).fetchone()[0] == "queued"
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
            poll_until(lambda: outbox.db.execute("SELECT state FROM events WHERE seq = ?",
                                                 (seq,)).fetchone()[0] != "queued",
                       what="the alarm recorded as sent once the lock is free")
    finally:
        uplink.stop()


def _commit_alarm_bypassing_the_lock(outbox: Outbox) -> int:
    """Commit an alarm with the outbox's own code, taking only SQLite's lock (the test
    holds the flock that Outbox.transaction() would wait for)."""
    conn = outbox.db
    conn.execute("BEGIN IMMEDIATE")
    event = outbox.append(EventDraft(kind=EventKind.ALARM, code=120, occurred_at=utc_now(),
                                     clock_synced=True, boot_id="test", input="gate"))
    conn.execute("COMMIT")
    return event.seq
