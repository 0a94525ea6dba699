"""The write lock is waited on for a bounded time, and a waiter gets it the moment it is
free (another process holds it, as another daemon would)."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge.contract.events import ContactId, EventDraft, EventKind, Identity, utc_now
from edge.store.outbox import LockTimeout, Outbox

IDENTITY = Identity("test-school", "gate-1", "South gate")
HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("HELD", flush=True)
sys.stdin.readline()
fcntl.flock(fd, fcntl.LOCK_UN)
print("RELEASED", flush=True)
sys.stdin.readline()
"""


def alarm() -> EventDraft:
    return EventDraft(kind=EventKind.ALARM, code=ContactId.PANIC, occurred_at=utc_now(),
                      clock_synced=True, boot_id="boot", input="gate")


class Holder:
    """Another process holding the outbox's write lock until told to let go."""

    def __init__(self, database: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, f"{database}.writelock"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "HELD"

    def release(self) -> None:
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "RELEASED"

    def close(self) -> None:
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def outbox(tmp_path):
    with Outbox(tmp_path / "outbox.db", IDENTITY) as box:
        yield box


@pytest.fixture
def holder(outbox):
    held = Holder(outbox.path)
    yield held
    held.close()


class Attempt:
    """A commit in a thread of its own; the test waits on its end, not on a clock."""

    def __init__(self, outbox_path: Path, timeout: float):
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.waited: float | None = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(outbox_path, timeout))
        self.thread.start()

    def _run(self, path: Path, timeout: float) -> None:
        try:
            with Outbox(path, IDENTITY) as box:
                self.started = time.monotonic()
                box.commit_event(alarm(), timeout=timeout)
        except BaseException as err:
            self.error = err
        finally:
            self.waited = time.monotonic() - self.started
            self.done.set()

    def finish(self, within: float) -> None:
        assert self.done.wait(within), "the commit is still waiting"
        self.thread.join(5)


def test_a_commit_waits_no_longer_than_its_bound_for_a_lock_held_elsewhere(outbox, holder):
    bound = 0.3
    attempt = Attempt(outbox.path, bound)
    attempt.finish(within=30 * bound)  # without a bound it waits as long as the holder
    assert isinstance(attempt.error, LockTimeout)
    assert attempt.waited >= bound - 0.01  # it did wait (Event.wait rounds to the tick)
    assert outbox.summary().last_seq == 0  # a failed commit wrote nothing


def test_a_waiting_commit_gets_the_lock_as_soon_as_it_is_released(outbox, holder):
    attempt = Attempt(outbox.path, timeout=120)
    assert not attempt.done.wait(0.2)  # it waits while the other process holds the lock
    holder.release()
    attempt.finish(within=30)  # long before its own bound: woken by the release
    assert attempt.error is None and outbox.summary().last_seq == 1


def test_an_abandoned_wait_does_not_keep_the_lock(outbox, holder):
    with pytest.raises(LockTimeout):
        outbox.commit_event(alarm(), timeout=0.1)
    holder.release()
    # The kernel gives our abandoned request the lock after the release; it must be
    # given back at once: another process can take it.
    fd = os.open(f"{outbox.path}.writelock", os.O_RDWR)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the abandoned request kept the lock"
                threading.Event().wait(0.01)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    assert outbox.commit_event(alarm(), timeout=1).seq == 1


def test_a_retry_after_a_timeout_is_served_by_the_same_wait(outbox, holder):
    """The retry comes while the first, abandoned request still waits in the kernel:
    when the lock comes, the retry has it (it is not given back under its feet)."""
    with pytest.raises(LockTimeout):
        outbox.commit_event(alarm(), timeout=0.1)
    done = threading.Event()
    results = []

    def retry():
        results.append(outbox.commit_event(alarm(), timeout=120).seq)
        done.set()

    # The same connection, as the button's recorder retries: SQLite allows it from
    # another thread only if told; here the thread is the only user meanwhile.
    outbox.db.close()
    outbox.db = sqlite3.connect(outbox.path, isolation_level=None, check_same_thread=False)
    thread = threading.Thread(target=retry)
    thread.start()
    assert not done.wait(0.2)
    holder.release()
    assert done.wait(30)
    thread.join(5)
    assert results == [1]


def test_a_writer_that_skips_the_flock_is_waited_on_only_for_what_is_left(outbox):
    """A person with the sqlite3 shell holds SQLite's own write lock."""
    other = sqlite3.connect(outbox.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        attempt = Attempt(outbox.path, 0.3)
        attempt.finish(within=30)
        assert isinstance(attempt.error, LockTimeout)
    finally:
        other.execute("ROLLBACK")
        other.close()
