"""The uplink's work besides the alarm path, done between its rounds or on a thread of its own.

- The retained heartbeat on ``health`` (link supervision), every ``heartbeat_interval`` and
  at once when the self-test daemon has new checks; its PUBACK times the round trip to
  the broker for the self-test's broker check. One heartbeat at a time: on a slow link a
  second would queue in paho where an alarm would wait behind it.
- The results of the platform's tests, sent back when they are known (by the side lane).
- The summary of rejections not answered one by one.
- The daemon's state for ``guardpost status`` and the self-test (in the outbox).
- The hourly prune (the first a minute after start: a backlog waiting since before the
  start goes first), on a thread with its own outbox connection, so that its deletions
  never hold up the loop (the outbox keeps each of its transactions short).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho

from edge.config import Config
from edge.contract.events import utc_iso, utc_now
from edge.contract.messages import Topics, health_payload, reply_payload
from edge.daemons.button.latch import AlarmLatch
from edge.daemons.uplink.lane import SideLane, SideMessage
from edge.runtime.clock import clock_synchronised
from edge.store.outbox import Outbox
from edge.store.snapshots import SnapshotStore

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 3600.0
PRUNE_FIRST_S = 60.0        # after a start, a backlog goes before the first prune
CHORES_EVERY_S = 0.25       # how often finished platform tests and new self-checks are looked for


class Housekeeping:
    """Heartbeat, test results, rejection summaries and pruning, each when it is due."""

    def __init__(self, config: Config, topics: Topics, lane: SideLane,
                 reply_properties: Callable[[dict], object], health_extras: Callable[[], dict]):
        self.config = config
        self.topics = topics
        self.lane = lane
        self._reply_properties = reply_properties
        self._health_extras = health_extras      # inbound counts, delivery figures
        self._started = time.monotonic()
        self.next_heartbeat = 0.0
        self._heartbeat_mid: int | None = None
        self._heartbeat_sent = 0.0
        self.broker_rtt_ms: float | None = None  # the last heartbeat's PUBLISH -> PUBACK
        self.rtt_at: str | None = None
        self._selftest_seen: str | None = None   # updated_at of the checks last published
        self._replying: set[str] = set()         # tests whose result reply is on its way
        self._next_chores = 0.0
        self._next_prune = time.monotonic() + PRUNE_FIRST_S
        self._pruner: threading.Thread | None = None

    # -- the heartbeat ---------------------------------------------------------------------

    def heartbeat(self, client: paho.Client, outbox: Outbox, session: int, now: float,
                  properties) -> None:
        self.next_heartbeat = now + self.config.uplink.heartbeat_interval
        if self._heartbeat_mid is not None:
            return  # the last one is not at the broker yet: a slow or dead link
        latched = sorted(AlarmLatch(outbox, self.config.inputs).latches())
        selftest = outbox.daemons.all().get("selftest")
        checks = None
        if selftest is not None:
            self._selftest_seen = selftest[1]
            checks = json.loads(selftest[0])
        info = client.publish(self.topics.health, health_payload(
            self.config.identity, session=session, uptime_s=now - self._started,
            outbox=outbox.backlog(), clock_synced=clock_synchronised(), latched=latched,
            selftest=checks, **self._health_extras()), qos=1, retain=True,
            properties=properties)
        self._heartbeat_mid, self._heartbeat_sent = info.mid, now
        outbox.sessions.seen(session)

    def acked(self, mid: int, now: float) -> bool:
        """The heartbeat's PUBACK (True), which times the round trip to the broker."""
        if mid != self._heartbeat_mid:
            return False
        self._heartbeat_mid = None
        self.broker_rtt_ms = round((now - self._heartbeat_sent) * 1000, 3)
        self.rtt_at = utc_iso(utc_now())
        return True

    def connection_lost(self) -> None:
        """A heartbeat in flight is re-sent by paho; the next one need not wait for it."""
        self._heartbeat_mid = None

    # -- between rounds --------------------------------------------------------------------

    def chores(self, client: paho.Client, outbox: Outbox, session: int, now: float,
               properties) -> None:
        """The heartbeat when due; every quarter second, results of the platform's tests
        that have finished, and new self-checks (published at once)."""
        if now >= self.next_heartbeat:
            self.heartbeat(client, outbox, session, now, properties)
        if now < self._next_chores:
            return
        self._next_chores = now + CHORES_EVERY_S
        for test_id, request, state, result in outbox.alarm_tests.replies_due(self._replying):
            self._replying.add(test_id)
            self.lane.add(SideMessage(request["reply_topic"], reply_payload(
                self.config.identity, command="test", request_id=request["request_id"],
                status=state, test_id=test_id, result=result),
                self._reply_properties(request), test_id=test_id, reply=True))
        selftest = outbox.daemons.all().get("selftest")
        if selftest is not None and selftest[1] != self._selftest_seen:
            self.heartbeat(client, outbox, session, now, properties)

    def reply_acked(self, message: SideMessage, code: int, reason: str, outbox: Outbox) -> None:
        """A test's result reply is at the broker (or refused by it: sent again, it would
        be refused again)."""
        if message.test_id is None:
            return
        self._replying.discard(message.test_id)
        if code >= 0x80:
            log.warning("the broker refused the result reply of test %s (%s)",
                        message.test_id, reason)
        outbox.alarm_tests.reply_state(message.test_id, "refused" if code >= 0x80 else "sent")

    # -- pruning ---------------------------------------------------------------------------

    def prune_when_due(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY_S
        if self._pruner is not None and self._pruner.is_alive():
            return  # the last one is still at it
        self._pruner = threading.Thread(target=self._prune, name="uplink-prune", daemon=True)
        self._pruner.start()

    def _prune(self) -> None:
        cfg = self.config
        keep = cfg.storage.keep_days
        try:
            with Outbox(cfg.storage.database, cfg.identity) as outbox:
                removed = outbox.prune(keep)
                pictures = SnapshotStore(outbox, cfg.storage.spool_dir,
                                         cfg.storage.spool_budget_mb * 1024 * 1024
                                         ).prune_delivered(keep)
        except Exception:  # the next hour tries again; the alarm path is not concerned
            log.exception("pruning the outbox failed")
            return
        if removed or pictures:
            log.info("pruned %d delivered event(s) and %d snapshot(s) older than %d days",
                     removed, pictures, keep)

    def stop(self, timeout: float = 5.0) -> None:
        if self._pruner is not None:
            self._pruner.join(timeout)
