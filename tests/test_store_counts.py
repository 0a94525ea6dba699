"""The outbox's counts are kept, not counted: whatever happens to the rows, they stay
exactly what a full recount says (a Hypothesis state machine against a recount)."""

from __future__ import annotations

import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from edge.contract.events import ContactId, EventDraft, EventKind, Identity, Priority, utc_now
from edge.store.outbox import Outbox

IDENTITY = Identity("test-school", "gate-1", "South gate")
KINDS = {EventKind.ALARM: ContactId.PANIC, EventKind.TEST: ContactId.MANUAL_TEST,
         EventKind.FAULT: ContactId.PANIC_ZONE_TROUBLE, EventKind.RESET: ContactId.PANIC_RESET,
         EventKind.RESTORE: ContactId.PANIC_ZONE_TROUBLE}


class OutboxCounts(RuleBasedStateMachine):
    @initialize()
    def open(self):
        self.directory = Path(tempfile.mkdtemp(prefix="counts-"))
        self.outbox = Outbox(self.directory / "outbox.db", IDENTITY)
        self.later = timedelta()

    def teardown(self):
        if hasattr(self, "outbox"):
            self.outbox.close()
            shutil.rmtree(self.directory)

    def rows(self, where: str = "1") -> list[tuple]:
        return self.outbox.db.execute(
            f"SELECT seq, id, state, ack_required FROM events WHERE {where} ORDER BY seq"
        ).fetchall()

    @rule(kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=4))
    def commit(self, kinds):
        self.outbox.commit_events(
            EventDraft(kind=kind, code=KINDS[kind], occurred_at=utc_now(), clock_synced=True,
                       boot_id="boot", input="gate") for kind in kinds)

    @rule(data=st.data())
    def publish(self, data):
        queued = [row[0] for row in self.rows("state = 'queued'")]
        picked = data.draw(st.lists(st.sampled_from(queued), unique=True) if queued
                           else st.just([]))
        assert self.outbox.mark_sent([*picked, 10**9]) == len(picked)  # an unknown seq too

    @rule(data=st.data())
    def acknowledge(self, data):
        known = [row[1] for row in self.rows()]
        picked = data.draw(st.lists(st.sampled_from(known), max_size=5) if known
                           else st.just([]))
        unknown = "01234567-89ab-7def-8000-000000400000"
        results = self.outbox.mark_acknowledged(
            [(event_id, utc_now(), "operator") for event_id in [*picked, unknown]])
        assert not results[-1].known

    @rule(days=st.integers(min_value=0, max_value=3))
    def prune(self, days):
        self.later += timedelta(days=days)
        self.outbox.prune(keep_days=1, now=utc_now() + self.later)

    @invariant()
    def counts_match_a_recount(self):
        if not hasattr(self, "outbox"):
            return
        summary = self.outbox.summary()
        recount: dict[str, dict[str, int]] = {}
        for state, priority, count in self.outbox.db.execute(
                "SELECT state, priority, count(*) FROM events GROUP BY state, priority"):
            recount.setdefault(state, {})[Priority(priority).name.lower()] = count
        assert summary.counts == recount
        queued = self.rows("state = 'queued'")
        assert summary.oldest_unsent_seq == (min(r[0] for r in queued) if queued else None)
        backlog = self.outbox.backlog()
        assert backlog["queued"] == len(queued)
        assert backlog["sent_unacknowledged"] == len(self.rows("state = 'sent' AND ack_required"))
        assert backlog["last_seq"] == self.outbox.db.execute(
            "SELECT value FROM counters WHERE name = 'event_seq'").fetchone()[0]


OutboxCounts.TestCase.settings = settings(max_examples=40, stateful_step_count=25,
                                          deadline=None)
test_counts_stay_exact_through_any_inserts_marks_acknowledgements_and_prunes = \
    OutboxCounts.TestCase
