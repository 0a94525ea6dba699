"""Bulk work in batches: no transaction holds the write lock for long.

A batch is sized to take about :data:`BATCH_TARGET_S` (adapted after each one to what the
last took: a busy SD card gets smaller batches), and the lock is released between
batches for at least :data:`PAUSE_S`, and as long as the batch took, so that a writer
woken by the release (an alarm commit) gets the lock before the bulk work takes it
again: the kernel wakes a waiting ``flock`` but does not hand the lock over.
"""

from __future__ import annotations

BATCH_TARGET_S = 0.005  # well under the 50 ms that any one transaction may hold the lock
PRUNE_FIRST_BATCH, MIN_BATCH, MAX_BATCH = 200, 20, 20_000
PAUSE_S = 0.002


def adapt_batch(batch: int, took: float) -> int:
    """The next batch size, aimed at :data:`BATCH_TARGET_S`; never more than doubling at
    once (one fast batch may have been luck)."""
    if took <= 0:
        return min(MAX_BATCH, batch * 2)
    wanted = int(batch * BATCH_TARGET_S / took)
    return max(MIN_BATCH, min(MAX_BATCH, batch * 2, wanted))


def pause_after(took: float) -> float:
    """How long to leave the lock free after a batch that held it ``took`` seconds."""
    return max(PAUSE_S, took)
