"""The durable outbox: one SQLite file shared by every daemon, the single source of truth.

An event is committed here (WAL, ``synchronous=FULL``: on disk before the commit
returns) before the guard gets any feedback, and it leaves only after the broker has
taken it (``sent``) and, for alarms and tests, the platform has acknowledged it
(``acknowledged``); delivered rows are pruned by age.

This package is the one repository: every table's SQL lives in ``edge/store/``, behind
typed methods (``tests/test_store_boundary.py`` fails if SQL appears anywhere else).
:class:`Outbox` is a connection, its transactions and the ``events`` table; the other
tables hang off it, one small module each: :attr:`Outbox.alarm_tests`,
:attr:`Outbox.sms`, :attr:`Outbox.latches`, :attr:`Outbox.sessions`, :attr:`Outbox.nonces`,
:attr:`Outbox.daemons` (and :class:`edge.store.snapshots.SnapshotStore`); the monthly
report reads through :class:`edge.store.reader.OutboxReader`.

Each thread opens its own :class:`Outbox` (SQLite connections are not shared across
threads). Writers take the cross-process write lock (:mod:`edge.store.lock`) and then
``BEGIN IMMEDIATE``, both within the caller's bound (``transaction(timeout=...)``): a
:class:`LockTimeout` is a failed commit, to be retried. No transaction holds the lock
long: bulk work (pruning, large batches of marks) goes in batches that each stay well
under 50 ms at a million rows, and every hot query is an index search
(``tests/test_store_plans.py`` checks the plans against a million events).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

from edge.contract.events import (
    ACK_REQUIRED,
    Event,
    EventDraft,
    Identity,
    Priority,
    utc_iso,
    utc_now,
)
from edge.contract.messages import SIGNED_PAST
from edge.runtime.clock import boot_id, clock_synchronised
from edge.runtime.durable import fsync_directory
from edge.store import history, schema
from edge.store.alarm_tests import AlarmTests
from edge.store.batches import PRUNE_FIRST_BATCH, adapt_batch, pause_after
from edge.store.daemon_state import DaemonStates
from edge.store.event_ids import event_id, follow, seq_of
from edge.store.latches import Latches
from edge.store.lock import LockTimeout, OutboxError, WriteLock
from edge.store.nonces import AcceptedNonces
from edge.store.queue_stats import QueueStats, QueueSummary
from edge.store.reserve import SpaceReserve
from edge.store.rows import AckResult, EventRow, QueuedMessage
from edge.store.sessions import Sessions
from edge.store.sms import SmsNotifications
from edge.store.trouble import (
    DiskFull,
    OutboxDamaged,
    OutboxReplaced,
    Trouble,
    WriteRefused,
    classify,
)
from edge.store.watermark import Mark, SequenceMark

__all__ = ["ACKNOWLEDGED", "QUEUED", "SENT", "STATES", "AckResult", "DiskFull", "EventRow",
           "LockTimeout", "Outbox", "OutboxDamaged", "OutboxError", "OutboxReplaced",
           "QueueSummary", "QueuedMessage", "WriteRefused"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = schema.SCHEMA_VERSION
QUEUED, SENT, ACKNOWLEDGED = "queued", "sent", "acknowledged"
STATES = (QUEUED, SENT, ACKNOWLEDGED)

# How long a writer waits for the write lock unless it says otherwise. An alarm commit
# asks for much less (ALARM_COMMIT_TIMEOUT_S) and retries.
WRITE_TIMEOUT_S = 10.0
LOOP_WRITE_TIMEOUT_S = 0.5  # a daemon's main loop: a timeout is retried at its next turn
ALARM_COMMIT_TIMEOUT_S = 0.5
# Opening may migrate a large database (once, at an upgrade): the others wait for it.
OPEN_TIMEOUT_S = 120.0
# Rows changed per transaction by bulk work (marks, acknowledgements): each such
# transaction stays a few milliseconds at a million rows.
ROWS_PER_TRANSACTION = 500

_COLUMNS = ", ".join(EventRow.COLUMNS)
_INSERT = (f"INSERT INTO events({_COLUMNS}) VALUES ({', '.join('?' * len(EventRow.COLUMNS))})")
_NEXT_SEQ = "UPDATE counters SET value = value + ? WHERE name = 'event_seq' RETURNING value"
_QUEUED_COLUMNS = ("SELECT seq, id, kind, priority, topic, payload, recovered_from IS NOT NULL"
                   " FROM events")


class _Trouble:
    damaged: str | None = None


def _create_group_writable(path: Path) -> None:
    """Create the outbox file 0660 if it is missing (an empty file is an empty database).

    SQLite would create it 0644 less the umask, 0640 under the units' UMask=0007: the
    other daemons, each its own user in the group guardpost, could not write it. Its
    journal files (-wal, -shm) take the database file's mode.

    Only ever a file this call creates (O_EXCL): closing a descriptor of a file that
    another connection of this process has open would drop that connection's POSIX
    locks (SQLite's locking rests on them)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o660)
    except FileExistsError:
        return
    except OSError:
        return  # a full disk, a directory not ours: SQLite meets it next and says which
    os.close(fd)


class Outbox:
    """One connection to the outbox database.

    ``checkpoint=False`` leaves WAL checkpoints to other connections: the button
    daemon uses it so that an alarm commit never pays for copying the WAL back into
    the database file (the uplink, which writes after every batch, does that work).

    ``db`` is the raw connection, for tests and benchmarks that look underneath; code
    under ``edge/`` and ``drivers/`` goes through the methods.
    """

    def __init__(self, path: str | Path, identity: Identity, *, checkpoint: bool = True,
                 open_timeout: float = OPEN_TIMEOUT_S, write_timeout: float = WRITE_TIMEOUT_S,
                 alarm_path: bool = False, repair: bool = True):
        self.path = Path(path)
        self.identity = identity
        # A daemon's main loop asks for a short one (LOOP_WRITE_TIMEOUT_S): a longer wait
        # there would hold up its watchdog, its wake-ups and, in the uplink, the network.
        self.write_timeout = write_timeout
        # alarm_path: this connection records or delivers alarms, and may draw on the
        # alarm reserve when the disk is full (edge.store.reserve).
        self.alarm_path = alarm_path
        # repair: a damaged file is moved aside and a new one opened in its place (the
        # daemons); tools that only look (status, queue) say so instead.
        self.repair_damage = repair
        self._checkpoint = checkpoint
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.reserve = SpaceReserve(self.path, 0)
        self._mark = SequenceMark(f"{self.path}.mark")
        self._lock = WriteLock(f"{self.path}.writelock")
        self.db: sqlite3.Connection | None = None
        self.epoch: str | None = None
        self._inode: int | None = None
        self._replaced_because: str | None = None
        # The numbers the open transaction took, for the mark once it commits (read
        # from the commit itself, not again from the database).
        self._due_seq: int | None = None
        self._due_session: int | None = None
        self._seq_floor = 0        # the highest number a damaged file moved aside showed
        try:
            self._connect(open_timeout)
        except BaseException:
            self.close()
            raise
        self.alarm_tests = AlarmTests(self)
        self.sms = SmsNotifications(self)
        self.latches = Latches(self)
        self.nonces = AcceptedNonces(self)
        self.sessions = Sessions(self)
        self.daemons = DaemonStates(self)
        self._stats = QueueStats(self)

    # -- lifecycle -------------------------------------------------------------------

    def _connect(self, timeout: float) -> None:
        """Open the file, and open it again after giving back some of the alarm reserve
        (a full disk) or after moving a damaged file aside (:meth:`repair`)."""
        deadline = time.monotonic() + timeout
        repairs = 0
        while True:
            inode = None
            try:
                _create_group_writable(self.path)
                # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
                self.db = sqlite3.connect(self.path, isolation_level=None,
                                          timeout=WRITE_TIMEOUT_S, cached_statements=256)
                inode = self._inode = os.stat(self.path).st_ino
                self._busy_ms = -1
                self._open(self._checkpoint, max(0.0, deadline - time.monotonic()))
                return
            except sqlite3.DatabaseError as err:
                trouble = classify(err, self.path.parent)
                if (trouble is Trouble.DAMAGED and self.repair_damage and repairs < 2
                        and inode is not None):
                    repairs += 1
                    self._move_aside(inode, str(err), max(0.0, deadline - time.monotonic()))
                    continue
                if self.db is not None:
                    self.db.close()
                    self.db = None
                if trouble is Trouble.FULL:
                    # Any daemon may draw a step to open (its shared-memory index, a few
                    # pages): a daemon that cannot open cannot report the full disk either.
                    if self.reserve.release():
                        continue
                    raise DiskFull(f"{self.path}: cannot open the outbox, the disk is full "
                                   f"({err})") from err
                if trouble is Trouble.DAMAGED:
                    raise OutboxDamaged(f"{self.path}: the outbox is damaged ({err})") from err
                raise

    def _open(self, checkpoint: bool, timeout: float) -> None:
        mode = self.db.execute("PRAGMA journal_mode").fetchone()[0]
        if mode.lower() != "wal":
            # Switching a new file to WAL fails at once ("database is locked") if another
            # process is doing the same: two daemons starting together on first boot.
            self._lock.acquire(timeout)
            try:
                mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            finally:
                self._lock.release()
        if mode.lower() != "wal":
            raise OutboxError(f"{self.path}: cannot switch to WAL mode (got {mode})")
        self.db.execute("PRAGMA synchronous = FULL")
        if not checkpoint:
            self.db.execute("PRAGMA wal_autocheckpoint = 0")
        if schema.schema_version(self.db) != SCHEMA_VERSION:
            with self._locked_transaction(timeout):
                version = schema.schema_version(self.db)
                if version > SCHEMA_VERSION:
                    raise OutboxError(
                        f"{self.path}: schema version {version} is newer than this Guardpost "
                        f"({SCHEMA_VERSION}); refusing to touch it")
                schema.migrate(self.db)
                self.db.execute("INSERT OR IGNORE INTO counters(name, value)"
                                " VALUES ('event_seq', 0)")
        self._reconcile_history(timeout)
        self._adopt_ownership()
        legacy = self.counter("legacy_id_max_seq") or 0
        # A literal, as in the partial index: SQLite uses the index only for that term.
        self._legacy_lookup = (f"SELECT seq FROM events WHERE id = ? AND seq <= {legacy:d}"
                               if legacy else None)

    def _meta(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, name: str, value: str) -> None:
        self.db.execute("INSERT INTO meta(name, value) VALUES (?, ?) ON CONFLICT(name)"
                        " DO UPDATE SET value = excluded.value", (name, value))

    def _reconcile_history(self, timeout: float) -> None:
        """Compare the database with the mark file (:mod:`edge.store.history`); the first
        connection to find history lost begins the new epoch, under the write lock."""
        epoch, mark = self._meta("epoch"), self._mark.read()
        if (epoch is not None and mark is not None and mark.epoch == epoch
                and self.last_seq() >= mark.seq):
            self.epoch = epoch  # the usual case: read, nothing written
            return
        with self._locked_transaction(timeout):
            mark = self._mark.read()
            decision = history.reconcile(
                max(self.last_seq(), self._seq_floor), self.counter("mqtt_session") or 0,
                self._meta("epoch"), mark, replaced_because=self._replaced_because)
            self.epoch = decision.epoch
            if decision.new_epoch:
                self._set_meta("epoch", decision.epoch)
                self.set_counter("event_seq", decision.seq)
                if decision.session:
                    self.set_counter("mqtt_session", decision.session)
                if decision.lost is not None:
                    self._set_meta("lost_history", json.dumps(decision.lost.detail()))
                    log.critical("outbox history lost (%s): epoch %s begins at seq %d",
                                 decision.lost.reason, decision.epoch, decision.seq + 1)
                    self.append(history.history_fault(decision.lost, utc_now(),
                                                      clock_synchronised(), boot_id()))
        self._due_seq, self._due_session = self.last_seq(), self.counter("mqtt_session") or 0
        self._write_mark(sync=True)  # a new epoch, or the first mark: on the card at once
        self._replaced_because = None

    def _write_mark(self, *, sync: bool = False) -> None:
        """After a commit that took sequence or session numbers: the mark follows (see
        :mod:`edge.store.watermark`). A failure here loses nothing the commit has not
        already made durable, so it is logged, not raised."""
        # A number this commit did not take is given as 0: the mark keeps the larger
        # of what it holds and what it is given (edge.store.watermark).
        seq, session = self._due_seq or 0, self._due_session or 0
        self._due_seq = self._due_session = None
        try:
            self._mark.write(Mark(seq, session, self.epoch), sync=sync)
        except (OSError, sqlite3.Error) as err:
            log.error("could not advance the sequence mark %s: %s", self._mark.path, err)

    def _adopt_ownership(self) -> None:
        """Run as root (``guardpost doctor``, ``reset``, ``queue`` by an installer), files
        root creates here would lock the daemons out of their own database: give them
        to the owner of the state directory, as SQLite does for its WAL files."""
        if os.geteuid() != 0:
            return
        owner = self.path.parent.stat()
        if owner.st_uid == 0:
            return
        for name in (self.path, Path(f"{self.path}.writelock"), Path(f"{self.path}-wal"),
                     Path(f"{self.path}-shm"), self._mark.path, self.reserve.path):
            try:
                info = name.stat()
            except FileNotFoundError:
                continue
            if info.st_uid == 0:
                os.chown(name, owner.st_uid, owner.st_gid)

    def close(self) -> None:
        if self.db is not None:
            self._close_connection()
        self._mark.close()
        self._lock.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- a damaged file: moved aside, a new one in its place -----------------------------

    def _replaced(self) -> bool:
        """Whether the path names another file than the one this connection has open
        (another process moved a damaged outbox aside)."""
        try:
            return os.stat(self.path).st_ino != self._inode
        except FileNotFoundError:
            return True

    def _close_connection(self) -> None:
        """Close the SQLite connection. When the last connection to a WAL database closes,
        SQLite checkpoints it and deletes its WAL by name; for a file moved aside it does
        neither (``SQLITE_FCNTL_HAS_MOVED``, since 3.22), so a connection to a damaged
        file never deletes the WAL of the new one in its place (tested)."""
        if self.db is None:
            return
        db, self.db = self.db, None
        db.close()

    def follow(self) -> bool:
        """Open the outbox again if another process has put a new file in the place of
        a damaged one. A daemon's loop calls this every turn (a ``stat``); writes check
        it themselves. True if the connection changed."""
        if self.db is None or not self._replaced():
            return False
        self._reopen(None)
        return True

    def _reopen(self, reason: str | None, timeout: float = OPEN_TIMEOUT_S) -> None:
        self._close_connection()
        self._replaced_because = reason
        self._connect(timeout)

    def repair(self, reason: str, timeout: float | None = None) -> bool:
        """The outbox is damaged (``reason``: SQLite's error, or what ``quick_check``
        found): move it aside and open a new one in its place. Returns False if another
        process had done so already (this connection then simply follows it)."""
        bound = self.write_timeout if timeout is None else timeout
        self._lock.acquire(bound)
        try:
            moved = not self._replaced() and self._rename_aside(reason)
        finally:
            self._lock.release()
        self._reopen(reason if moved else None)
        return moved

    def _move_aside(self, inode: int, reason: str, timeout: float) -> None:
        """At open: the file found damaged is moved aside, unless another process did
        (this connection, to a file no longer in place, is closed either way)."""
        self._inode = inode
        self._lock.acquire(timeout)
        try:
            if not self._replaced():
                self._rename_aside(reason)
                self._replaced_because = reason
            else:
                self._close_connection()
        finally:
            self._lock.release()

    def _rename_aside(self, reason: str) -> bool:
        """Under the write lock: rename the database and its WAL and index to
        ``<name>.damaged-<time>`` (kept for inspection and read back by
        :mod:`edge.store.salvage`)."""
        self._seq_floor = max(self._seq_floor, self._readable_seq())
        stamp = utc_now().strftime("%Y%m%dT%H%M%S.%fZ")
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{self.path}{suffix}", f"{aside}{suffix}")
        with contextlib.suppress(OSError):
            fsync_directory(self.path.parent)
        # Still under the lock: no new file's WAL exists yet for this close to harm.
        self._close_connection()
        log.critical("the outbox is damaged (%s): moved aside to %s, a new one begins; "
                     "what can be read of it will be recovered", reason, aside.name)
        return True

    def _readable_seq(self) -> int:
        """The highest sequence number the damaged file still shows, if any can be read:
        the new history starts above it even if the mark file was lost as well."""
        best = 0
        for query in ("SELECT value FROM counters WHERE name = 'event_seq'",
                      "SELECT max(seq) FROM events"):
            with contextlib.suppress(sqlite3.Error, AttributeError):
                value = self.db.execute(query).fetchone()[0]
                best = max(best, int(value or 0))
        return best

    # -- transactions ----------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, timeout: float | None = None, *,
                    durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction, taken with the write lock within ``timeout`` seconds
        (default :data:`WRITE_TIMEOUT_S`); on disk when the block ends. Raises
        :class:`LockTimeout` if the lock was not had in time: nothing was written.

        A full disk raises :class:`DiskFull` (an alarm-path connection gives back a step
        of the alarm reserve first: try again at once); a damaged file is moved aside
        and :class:`OutboxReplaced` raised (try again: into the new file). Both are
        ``TimeoutError``: nothing was written, as with a lock wait that ran out.

        ``durable=False`` is for work that may be lost in a power cut and simply done
        again (deleting delivered rows): its commit does not wait for the disk
        (``synchronous=NORMAL``), so it holds the lock for its own work only. The next
        durable commit, of any connection, puts it on disk with its own."""
        bound = self.write_timeout if timeout is None else timeout
        deadline = time.monotonic() + bound
        self._lock.acquire(bound)
        held, damaged = True, None
        try:
            if self._inode is not None and self._replaced():
                # Another process moved a damaged file aside: follow it to the new one.
                self._lock.release()
                held = False
                self._reopen(None, max(0.5, deadline - time.monotonic()))
                self._lock.acquire(max(0.0, deadline - time.monotonic()))
                held = True
            with self._sqlite_trouble() as trouble:
                yield from self._begin_commit(deadline, bound, durable)
            damaged = trouble.damaged
        finally:
            if held:
                self._lock.release()
        if damaged is not None:
            self._reopen(damaged)
            raise OutboxReplaced(f"{self.path}: the outbox was damaged ({damaged}); moved "
                                 "aside, a new one opened: try again")

    def _begin_commit(self, deadline: float, bound: float, durable: bool):
        if not durable:
            self.db.execute("PRAGMA synchronous = NORMAL")
        try:
            # SQLite's own wait (a writer that skips the flock, such as a person with
            # the sqlite3 shell) gets what is left of the bound, no more (in steps of
            # 10 ms: the same setting is not written again at every commit).
            left_ms = max(0, int((deadline - time.monotonic()) * 100)) * 10
            if left_ms != self._busy_ms:
                self.db.execute(f"PRAGMA busy_timeout = {left_ms:d}")
                self._busy_ms = left_ms
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as err:
                if "locked" in str(err) or "busy" in str(err):
                    raise LockTimeout(f"{self.path}: {err} after {bound:g} s") from err
                raise
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                self._due_seq = self._due_session = None  # rolled back: not taken
                if self.db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self.db.execute("ROLLBACK")
                raise
            if self._due_seq is not None or self._due_session is not None:
                self._write_mark()
        finally:
            if not durable:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("PRAGMA synchronous = FULL")

    @contextlib.contextmanager
    def _sqlite_trouble(self):
        """Turn SQLite's word for a full disk or a damaged file into what the callers
        act on (inside the write lock; a damaged file is renamed here, while it is held)."""
        trouble = _Trouble()
        try:
            yield trouble
        except sqlite3.DatabaseError as err:
            kind = classify(err, self.path.parent)
            if kind is Trouble.FULL:
                released = self.reserve.release() if self.alarm_path else 0
                raise DiskFull(f"{self.path}: the disk is full ({err})", released) from err
            if kind is Trouble.DAMAGED and self.repair_damage:
                self._rename_aside(str(err))
                trouble.damaged = str(err)
                return
            if kind is Trouble.DAMAGED:
                raise OutboxDamaged(f"{self.path}: the outbox is damaged ({err})") from err
            raise

    _locked_transaction = transaction

    def lost_history(self) -> dict | None:
        """What the platform was told was lost when the current epoch began, if anything
        (:mod:`edge.store.history`)."""
        value = self._meta("lost_history")
        return json.loads(value) if value else None

    def integrity_check(self, limit: int = 5) -> list[str]:
        """``PRAGMA quick_check``: ``["ok"]``, or up to ``limit`` problems. It reads the
        whole file: run it rarely."""
        return [row[0] for row in self.db.execute(f"PRAGMA quick_check({int(limit):d})")]

    # -- counters --------------------------------------------------------------------

    def next_counter(self, name: str) -> int:
        """Increment and return a persistent counter (inside a transaction)."""
        value = self.db.execute(
            "INSERT INTO counters(name, value) VALUES (?, 1) "
            "ON CONFLICT(name) DO UPDATE SET value = value + 1 RETURNING value",
            (name,)).fetchone()[0]
        if name == "mqtt_session":
            self._due_session = value  # a session number, like a sequence, never repeats
        return value

    def counter(self, name: str) -> int | None:
        """A persistent counter's value, None if it was never set."""
        row = self.db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_counter(self, name: str, value: int, *, only_if_missing: bool = False) -> int:
        """Set a counter (inside a transaction); returns its value afterwards."""
        if only_if_missing:
            self.db.execute("INSERT OR IGNORE INTO counters(name, value) VALUES (?, ?)",
                            (name, value))
        else:
            self.db.execute("INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name)"
                            " DO UPDATE SET value = excluded.value", (name, value))
        return self.counter(name)

    def last_seq(self) -> int:
        """The last sequence number given to an event (0 before the first)."""
        return self.counter("event_seq") or 0

    # -- committing events -----------------------------------------------------------

    def _take_seqs(self, count: int) -> int:
        """Inside a transaction: step the sequence by ``count``; returns the last number.
        The ids about to be made follow the newest one here, whoever made it."""
        # "seq > 0" (always true) makes it a search of the primary key, read from its end.
        newest = self.db.execute("SELECT id FROM events WHERE seq > 0 ORDER BY seq DESC"
                                 " LIMIT 1").fetchone()
        if newest is not None:
            follow(newest[0])
        self._due_seq = self.db.execute(_NEXT_SEQ, (count,)).fetchone()[0]
        return self._due_seq

    def append(self, draft: EventDraft) -> Event:
        """Add an event inside the caller's :meth:`transaction`; it is durable at its end."""
        if not self.db.in_transaction:
            raise OutboxError("append() must run inside Outbox.transaction()")
        seq = self._take_seqs(1)
        event = Event(id=event_id(seq), seq=seq, draft=draft)
        self.db.execute(_INSERT, self._values(event, utc_iso(utc_now())))
        return event

    def reserve_events(self, count: int) -> list[tuple[int, str]]:
        """Inside a transaction: the next ``count`` sequence numbers with their event ids,
        for events the caller then inserts with :meth:`insert_events` in the same
        transaction (an event that names another of the same commit, a repeat its alarm,
        needs that id first). Every one reserved must be inserted."""
        if not self.db.in_transaction:
            raise OutboxError("reserve_events() must run inside Outbox.transaction()")
        last = self._take_seqs(count)
        return [(seq, event_id(seq)) for seq in range(last - count + 1, last + 1)]

    def insert_events(self, events: list[Event]) -> None:
        """Inside a transaction: the events of :meth:`reserve_events`, in one statement."""
        committed_at = utc_iso(utc_now())
        self.db.executemany(_INSERT, [self._values(e, committed_at) for e in events])

    def _values(self, event: Event, committed_at: str) -> tuple:
        draft, kind = event.draft, event.draft.kind
        return (event.seq, event.id, kind.value, int(draft.code), int(draft.priority),
                draft.input, utc_iso(draft.occurred_at), committed_at,
                int(draft.clock_synced), draft.boot_id, draft.repeat_of,
                int(kind in ACK_REQUIRED), f"event/{kind.value}",
                event.payload(self.identity, self.epoch), QUEUED, None, None, None, None)

    def commit_event(self, draft: EventDraft, *, timeout: float | None = None) -> Event:
        """Commit one event durably and return it with its id and sequence number."""
        with self.transaction(timeout):
            return self.append(draft)

    def commit_events(self, drafts: Iterable[EventDraft], *,
                      timeout: float | None = None) -> list[Event]:
        """Commit several events in one transaction (one write to disk for all, one
        step of the sequence): each is durable when this returns, as with
        :meth:`commit_event`. How a burst of presses is recorded at the disk's pace."""
        drafts = list(drafts)
        if not drafts:
            return []
        with self.transaction(timeout):
            last = self._take_seqs(len(drafts))
            events = [Event(id=event_id(seq), seq=seq, draft=draft)
                      for seq, draft in zip(range(last - len(drafts) + 1, last + 1), drafts,
                                            strict=True)]
            committed_at = utc_iso(utc_now())
            self.db.executemany(_INSERT, [self._values(e, committed_at) for e in events])
        return events

    def insert_recovered(self, rows: list[tuple], source: str) -> tuple[int, int]:
        """Events read back from a damaged outbox (:mod:`edge.store.salvage`), as
        :class:`EventRow` values, in batches. Each keeps its id, number and bytes; it is
        queued again unless it was known delivered. Returns ``(inserted, clashed)``:
        an event whose number is taken here by another id cannot come back (counted)."""
        inserted = clashed = 0
        delivered = {ACKNOWLEDGED}
        columns = (*EventRow.COLUMNS, "recovered_from")
        sql = (f"INSERT OR IGNORE INTO events({', '.join(columns)})"
               f" VALUES ({', '.join('?' * len(columns))})")
        rows = sorted(rows)
        for start in range(0, len(rows), ROWS_PER_TRANSACTION):
            with self.transaction():
                for row in rows[start:start + ROWS_PER_TRANSACTION]:
                    values = list(row)
                    state, ack_required = values[14], values[11]
                    if not (state in delivered or (state == SENT and not ack_required)):
                        values[14:19] = [QUEUED, None, None, None, None]
                    if self.db.execute(sql, (*values, source)).rowcount:
                        inserted += 1
                    elif self.db.execute("SELECT id FROM events WHERE seq = ?",
                                         (values[0],)).fetchone()[0] != values[1]:
                        clashed += 1
        return inserted, clashed

    # -- the uplink's side -----------------------------------------------------------

    def next_queued(self, limit: int, exclude: Iterable[int] = ()) -> list[QueuedMessage]:
        """Up to ``limit`` queued rows in publishing order, skipping ``exclude`` (in flight)."""
        skip = set(exclude)
        return [row for row in self._queued_from(-1, limit + len(skip))
                if row.seq not in skip][:limit]

    def queued_after(self, priority: int, seq: int, limit: int) -> list[QueuedMessage]:
        """Up to ``limit`` queued rows that come after ``(priority, seq)`` in publishing
        order: how the uplink walks a backlog without re-reading what it has sent."""
        rows = self.db.execute(
            f"{_QUEUED_COLUMNS} WHERE state = 'queued' AND priority = ? AND seq > ?"
            " ORDER BY seq LIMIT ?", (priority, seq, limit)).fetchall()
        result = [QueuedMessage(*row) for row in rows]
        if len(result) < limit:
            result += self._queued_from(priority, limit - len(result))
        return result

    def _queued_from(self, priority: int, limit: int) -> list[QueuedMessage]:
        """Queued rows of priorities above ``priority``, in publishing order (a range
        search of the queue's index; -1 for the whole queue)."""
        rows = self.db.execute(
            f"{_QUEUED_COLUMNS} WHERE state = 'queued' AND priority > ?"
            " ORDER BY priority, seq LIMIT ?", (priority, limit)).fetchall()
        return [QueuedMessage(*row) for row in rows]

    def mark_sent(self, seqs: Iterable[int], at: datetime | None = None) -> int:
        """The broker has taken these rows (PUBACK). Returns how many changed state.

        The uplink calls this for batches (every few tens of milliseconds during a
        drain), one transaction per :data:`ROWS_PER_TRANSACTION` rows: rows whose mark
        is lost in a crash are simply published again, which at-least-once delivery
        allows and the platform de-duplicates by id.
        """
        seqs = list(seqs)
        stamp = utc_iso(at or utc_now())
        changed = 0
        for start in range(0, len(seqs), ROWS_PER_TRANSACTION):
            chunk = seqs[start:start + ROWS_PER_TRANSACTION]
            with self.transaction() as conn:
                changed += conn.execute(
                    "UPDATE events SET state = 'sent', sent_at = ? WHERE state = 'queued'"
                    f" AND seq IN ({','.join('?' * len(chunk))})", (stamp, *chunk)).rowcount
        return changed

    def mark_acknowledged(
        self, acks: Iterable[tuple[str, datetime, str | None]],
        nonces: Iterable[tuple[str, str, datetime] | None] | None = None,
    ) -> list[AckResult]:
        """The platform has acknowledged these events: ``(event_id, at, by)`` each;
        ``nonces``, one per acknowledgement, ``(nonce, key_id, signed_at)`` of the signed
        message it came in, is recorded in the same transaction (never accepted again)."""
        acks = list(acks)
        nonces = list(nonces) if nonces is not None else [None] * len(acks)
        results = []
        for start in range(0, len(acks), ROWS_PER_TRANSACTION):
            end = start + ROWS_PER_TRANSACTION
            with self.transaction():
                results += [self._acknowledge(*ack) for ack in acks[start:end]]
                recorded = [n for n in nonces[start:end] if n is not None]
                for nonce in recorded:
                    self.nonces.record(*nonce)
                self.nonces.prune({key_id for _, key_id, _ in recorded}, SIGNED_PAST)
        return results

    def _acknowledge(self, event_id: str, at: datetime, by: str | None) -> AckResult:
        seq = self._seq_of(event_id)
        if seq is None:
            return AckResult(event_id, known=False)
        state = self.db.execute("SELECT state FROM events WHERE seq = ?", (seq,)).fetchone()[0]
        if state == ACKNOWLEDGED:
            return AckResult(event_id, known=True, already=True)
        # An ack can overtake our own bookkeeping of the PUBACK: either way the broker
        # had the message, so sent_at is filled if it was still missing.
        received = utc_iso(utc_now())
        self.db.execute(
            "UPDATE events SET state = 'acknowledged', acknowledged_at = ?, acknowledged_by = ?,"
            " ack_received_at = ?, sent_at = coalesce(sent_at, ?) WHERE seq = ?",
            (utc_iso(at), by, received, received, seq))
        return AckResult(event_id, known=True)

    def prune(self, keep_days: int, now: datetime | None = None, *,
              budget_s: float | None = None) -> int:
        """Delete delivered rows older than ``keep_days``; never an undelivered one.

        In batches (:mod:`edge.store.batches`), releasing the write lock between
        them. ``budget_s`` stops after about that long (the rest is left for the next
        call). Returns how many rows went.

        Rows stamped more than a day *ahead* of now go too: committed while the wall
        clock was wildly ahead (a bogus time server), they would otherwise stay for as
        long as the clock had been wrong."""
        now = now or utc_now()
        started = time.monotonic()
        removed = 0
        for where, stamp in (("committed_at < ?", now - timedelta(days=keep_days)),
                             ("committed_at > ?", now + timedelta(days=1))):
            batch = PRUNE_FIRST_BATCH
            while True:
                took = time.monotonic()
                # Not durable: a deletion lost in a power cut is done again next time.
                with self.transaction(durable=False) as conn:
                    deleted = conn.execute(
                        "DELETE FROM events WHERE seq IN (SELECT seq FROM events"
                        f" WHERE {schema.PRUNABLE} AND {where} LIMIT ?)",
                        (utc_iso(stamp), batch)).rowcount
                took = time.monotonic() - took
                removed += deleted
                if budget_s is not None and time.monotonic() - started >= budget_s:
                    return removed
                if deleted < batch:
                    break
                batch = adapt_batch(batch, took)
                time.sleep(pause_after(took))
        return removed

    # -- reading ---------------------------------------------------------------------

    def _seq_of(self, event_id: str) -> int | None:
        """The sequence number of the row with this id, if there is one: through the
        primary key for ids of schema 6 on, through the legacy index for older ones."""
        seq = seq_of(event_id)
        if seq is not None and self.db.execute(
                "SELECT 1 FROM events WHERE seq = ? AND id = ?", (seq, event_id)).fetchone():
            return seq
        if self._legacy_lookup is None:
            return None
        row = self.db.execute(self._legacy_lookup, (event_id,)).fetchone()
        return row[0] if row else None

    def event_states(self, event_ids: Iterable[str]) -> dict[str, str]:
        """The state of each of these events still in the outbox, by id."""
        states = {}
        for eid in event_ids:
            seq = self._seq_of(eid)
            if seq is not None:
                states[eid] = self.db.execute("SELECT state FROM events WHERE seq = ?",
                                              (seq,)).fetchone()[0]
        return states

    def event(self, event_id: str) -> EventRow | None:
        """The row of one event, None if it is not (or no longer) in the outbox."""
        seq = self._seq_of(event_id)
        if seq is None:
            return None
        return EventRow(*self.db.execute(f"SELECT {_COLUMNS} FROM events WHERE seq = ?",
                                         (seq,)).fetchone())

    def get_event_row(self, event_id: str) -> dict | None:
        """:meth:`event` as a dictionary of its columns."""
        row = self.event(event_id)
        return row.as_dict() if row else None

    def events_after(self, seq: int, kinds: Iterable[str], *,
                     first_alarms_only: bool = True) -> list[EventRow]:
        """Events after ``seq`` of these kinds, in order; repeats of an alarm left out
        unless ``first_alarms_only`` is false. How a daemon follows the new events."""
        kinds = tuple(kinds)
        repeats = " AND repeat_of IS NULL" if first_alarms_only else ""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM events WHERE seq > ? AND kind IN"
            f" ({','.join('?' * len(kinds))}){repeats} ORDER BY seq", (seq, *kinds))
        return [EventRow(*row) for row in rows]

    def oldest_open_alarm_since(self, since: datetime) -> int | None:
        """The lowest seq of a first alarm committed since ``since`` that the platform has
        not acknowledged (queued, or sent and waiting), through the two partial indexes."""
        stamp = utc_iso(since)
        # "priority >= 0" and "seq > 0" are always true: they make each query a range
        # search of its partial index instead of a walk of the whole index.
        found = [self.db.execute(
            f"SELECT min(seq) FROM events WHERE {where} AND kind = 'alarm'"
            " AND repeat_of IS NULL AND committed_at >= ?", (stamp,)).fetchone()[0]
            for where in ("state = 'queued' AND priority >= 0",
                          "state = 'sent' AND ack_required = 1 AND seq > 0")]
        found = [seq for seq in found if seq is not None]
        return min(found) if found else None

    def summary(self, now: datetime | None = None) -> QueueSummary:
        """What ``guardpost queue`` prints, from exact counts and index searches."""
        return self._stats.summary(now)

    def backlog(self, now: datetime | None = None) -> dict:
        """The heartbeat's figures: queued and sent-unacknowledged counts, the oldest
        unsent row's age, the last sequence number. No scan at any depth."""
        return self._stats.backlog(now)

    # -- re-publication and inbound (uplink) ---------------------------------------------

    def urgent_queued(self) -> bool:
        """Whether an alarm or a test waits to be published (the uplink then connects at
        once instead of waiting out its backoff)."""
        return self.db.execute(
            "SELECT 1 FROM events WHERE state = 'queued' AND priority <= ? LIMIT 1",
            (int(Priority.TEST),)).fetchone() is not None

    def sent_unacknowledged(self) -> list[tuple[str, int, int, str | None]]:
        """Events the broker took that the platform has not acknowledged, oldest first:
        ``(id, seq, priority, sent_at)`` each (they are published again until it does)."""
        return self.db.execute(
            "SELECT id, seq, priority, sent_at FROM events"
            " WHERE state = 'sent' AND ack_required = 1 ORDER BY seq").fetchall()

    def published_rows(self, event_ids: Iterable[str]) -> list[QueuedMessage]:
        """These events as they were published (same bytes), still unacknowledged, in
        publishing order: what the uplink publishes again."""
        rows: list[QueuedMessage] = []
        for eid in event_ids:
            seq = self._seq_of(eid)
            if seq is None:
                continue
            row = self.db.execute(f"{_QUEUED_COLUMNS} WHERE seq = ? AND state != 'acknowledged'",
                                  (seq,)).fetchone()
            if row is not None:
                rows.append(QueuedMessage(*row))
        return sorted(rows, key=lambda row: (row.priority, row.seq))
