"""Whether the outbox still holds its whole history, decided when it is opened.

The database says how far its sequence went (``event_seq``) and which history it belongs
to (its epoch, in ``meta``); the mark file (:mod:`edge.store.watermark`) says how far the
sequence had gone, whatever happened to the database since. :func:`reconcile` compares
the two:

- they agree (or the database is ahead: a mark write lost in a power cut): nothing to do;
- a new outbox and no mark: a first start, a new epoch;
- the mark is ahead, or the database is a stranger to it (no epoch: a file cut to
  nothing, a damaged one moved aside; another epoch: an old copy put back): history was
  lost. A new epoch begins, the sequence goes on above everything either has seen, and a
  fault event (Contact ID 354, failure to communicate events) tells the platform which
  numbers of the old epoch will never come.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.contract.events import ContactId, EventDraft, EventKind, uuid7
from edge.store.watermark import Mark


@dataclass(frozen=True)
class Lost:
    """What the platform is told when history was lost."""

    previous_epoch: str | None
    last_seq_before: int        # the highest number the old history is known to have given
    last_seq_kept: int          # the highest number the database still holds
    reason: str

    def detail(self) -> dict:
        detail = {"check": "outbox", "problem": "history_lost", "reason": self.reason,
                  "previous_epoch": self.previous_epoch,
                  "last_seq_before": self.last_seq_before,
                  "last_seq_kept": self.last_seq_kept}
        if self.last_seq_before > self.last_seq_kept:
            detail["lost_from_seq"] = self.last_seq_kept + 1
            detail["lost_to_seq"] = self.last_seq_before
        return detail


@dataclass(frozen=True)
class Decision:
    epoch: str
    seq: int          # the sequence counter from now on (the next event gets seq + 1)
    session: int
    new_epoch: bool
    lost: Lost | None = None


def new_epoch() -> str:
    return str(uuid7())


def reconcile(db_seq: int, db_session: int, db_epoch: str | None, mark: Mark | None,
              *, replaced_because: str | None = None) -> Decision:
    """What the outbox's epoch and counters are from now on (see the module)."""
    seq, session = db_seq, db_session
    if mark is not None:
        seq, session = max(seq, mark.seq), max(session, mark.session)
    if db_epoch is not None and (mark is None or mark.epoch == db_epoch):
        if mark is None or db_seq >= mark.seq:
            return Decision(db_epoch, seq, session, new_epoch=False)
        lost = Lost(db_epoch, mark.seq, db_seq,
                    replaced_because or "the database holds fewer events than it had given "
                    "(its WAL lost, or an older copy)")
        return Decision(new_epoch(), seq, session, new_epoch=True, lost=lost)
    if mark is None:
        # A first start (or a database from before the mark, adopted as it is). If the
        # mark was lost along with the database, nothing here can know: the new epoch
        # still tells the platform that numbering starts over.
        return Decision(new_epoch(), seq, session, new_epoch=True)
    if db_epoch is None:
        reason = replaced_because or ("the database was replaced or cut short (it holds "
                                      "no history)" if db_seq == 0 else
                                      "the database is from before the mark")
    else:
        reason = replaced_because or "the database belongs to another history (a copy put back?)"
    return Decision(new_epoch(), seq, session, new_epoch=True,
                    lost=Lost(mark.epoch, mark.seq, db_seq if db_epoch else 0, reason))


def history_fault(lost: Lost, occurred_at, clock_synced: bool, boot: str) -> EventDraft:
    return EventDraft(kind=EventKind.FAULT, code=ContactId.FAILURE_TO_COMMUNICATE,
                      occurred_at=occurred_at, clock_synced=clock_synced, boot_id=boot,
                      detail=lost.detail())
