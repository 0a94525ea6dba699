"""Messages from the broker: the platform's acknowledgements and commands, and anything else
anyone manages to publish to this device. Each is handled in isolation.

Only a signed message is believed (:mod:`edge.daemons.uplink.gate`): signed by a platform
key the configuration lists, for exactly this topic, by a key whose roles allow it (``ack``
on ``ack``, ``command`` on ``cmd/...``), within the time window, with a nonce never
accepted before. Anything else is rejected with the reason and changes nothing; the
reasons are counted in health (``inbound.untrusted``).

paho calls :meth:`Inbound.on_message` from inside its read loop. Nothing may escape from
there: an exception would stop the uplink, and since a message is acknowledged to the
broker only once it is handled (manual acks), the broker would hand the same message
back after every restart. So a message becomes a normalised command (parsing leaves
nothing that can fail later) or a rejection, whatever it holds; a defect of ours that
raises is a rejection too.

- A rejection is acknowledged to the broker (it must not come back) and answered on
  ``rejected``, quoting the message verbatim and carrying its correlation data and its
  request or event id when they could be read; answers are rate-limited and go by the
  side lane, below every event.
- A failure of our side (the outbox cannot be written) is not the message's fault: it is
  neither rejected nor acknowledged to the broker; it is tried again, and if the
  connection ends first the broker delivers it again.
- Retained messages on ``ack`` and ``cmd/...`` are refused (MQTT 5: the subscription
  asks the broker not to send them at all); oversized ones are refused by the guarded
  client before they are held in memory.
- The platform's presence (:mod:`edge.contract.presence`, retained on
  ``{root}/_platform/+/presence``) is checked like the rest (signed by a key with the role
  ``ack``) but without the time window and nonce, since it is retained; what it says is
  kept in :attr:`Inbound.presence` for the fallback daemon (SMS at once while the
  platform is offline).
- The platform's tests are rate-limited (``alarm_test.min_interval_s``) besides the limit
  of tests waiting to run; the other commands (:mod:`edge.daemons.uplink.commands`) by
  ``COMMAND_LIMITS``.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import deque
from dataclasses import dataclass, replace
from datetime import timedelta

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.config import Config
from edge.contract.events import utc_now
from edge.contract.messages import (
    MAX_WAITING_TESTS,
    REQUEST_ID_MEMORY_H,
    Acknowledgement,
    Command,
    RejectedInput,
    TestRequest,
    Topics,
    ack_from_body,
    command_from_body,
    rejection_payload,
    reply_payload,
)
from edge.contract.presence import PresenceBoard, platform_id_of, presence_from_body
from edge.contract.signing import Opened, Rejected, open_envelope
from edge.daemons.selftest.alarmtest import request_test
from edge.daemons.uplink.commands import Answer, Commands
from edge.daemons.uplink.gate import Gate
from edge.daemons.uplink.lane import SideLane, SideMessage, TokenBucket
from edge.daemons.uplink.resend import Resend
from edge.runtime.mqtt import OversizedMessage, is_v5
from edge.runtime.wake import wake
from edge.store.outbox import Outbox

log = logging.getLogger(__name__)

STORAGE_ERRORS = (sqlite3.Error, OSError)  # our side failed, not the message
RETRY_S = 1.0        # a message our storage could not take is tried again after this
# Signatures are checked for at most this long per round of the uplink's loop (an Ed25519
# verification costs 0.1 to 0.3 ms): a flood of forgeries delays an alarm by one budget.
OPEN_BUDGET_S = 0.005
MAX_UNOPENED = 1000  # messages waiting for that check; QoS 0 floods beyond it are refused
RECEIVE_MAXIMUM = 64  # MQTT 5: QoS 1 messages the broker may send us before our PUBACKs
PRESENCE = "(presence)"  # the "command name" of a presence message in the queue to open


@dataclass(frozen=True)
class _Received:
    """What every message keeps until it is settled: how to acknowledge it to the broker,
    and what a rejection would quote."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    correlation: bytes | None
    order: int = 0    # arrival order: rejections are answered in it


@dataclass(frozen=True)
class _Refusal:
    received: _Received
    reason: str
    size: int | None = None
    request_id: str | None = None
    event_id: str | None = None
    opened: Opened | None = None    # a signed message's nonce, spent by the refusal


class Inbound:
    """Takes what the broker delivers, and settles it between the loop's network rounds."""

    def __init__(self, config: Config, topics: Topics, lane: SideLane):
        self.config = config
        self.topics = topics
        self.lane = lane
        up = config.uplink
        self._bucket = TokenBucket(up.rejections_per_minute / 60, up.rejection_burst)
        self._v5 = is_v5(config.broker)
        self.counts = {"received": 0, "accepted": 0, "refused": 0, "rejected": 0,
                       "too_large": 0, "unanswered": 0}
        self.gate = Gate(config.trust.keyring())
        self.commands = Commands(config)
        self._acks: list[tuple[Acknowledgement, _Received, Opened]] = []
        self._commands: list[tuple[TestRequest | Command, str, str | None, _Received,
                                   Opened]] = []
        self._unopened: deque[tuple[_Received, str | None, str]] = deque()  # to be checked
        self._refusals: list[_Refusal] = []
        self._retry_at = 0.0
        self._suppressed = 0                 # rejections not answered since the last answer
        self._suppressed_last: tuple[str, str] | None = None  # (topic, reason)
        self._tests_not_before = 0.0         # monotonic: the next platform test may run then
        self._arrivals = 0
        self._root = topics.prefix.rsplit("/", 2)[0]
        self.presence = PresenceBoard()
        self._presence_done: list[_Received] = []   # taken, to be acknowledged to the broker

    def health(self) -> dict:
        """The counts, and why messages were not believed (``untrusted``, by kind)."""
        return {**self.counts, "untrusted": self.gate.health()}

    def start(self, outbox: Outbox, now: float) -> None:
        """The platform's last test counts across a restart (clamped: a wall clock that
        jumps cannot block tests for longer than the interval)."""
        self.gate.load(outbox)
        last = outbox.alarm_tests.last_platform_request_at()
        if last is not None:
            interval = self.config.alarm_test.min_interval_s
            elapsed = (utc_now() - last).total_seconds()
            self._tests_not_before = now + min(interval, max(0.0, interval - elapsed))

    # -- paho's callbacks: never raise ----------------------------------------------------

    def on_message(self, client: paho.Client, userdata, message: paho.MQTTMessage) -> None:
        self.counts["received"] += 1
        self._arrivals += 1
        try:
            self._receive(message)
        except Exception as err:  # a defect of ours must not become a crash loop
            log.exception("a message could not be handled; it is rejected")
            self._refusals.append(_Refusal(_received(message, self._v5, self._arrivals),
                                           f"could not be handled ({type(err).__name__})"))

    def on_oversized(self, message: OversizedMessage) -> None:
        self.counts["received"] += 1
        self.counts["too_large"] += 1
        self._arrivals += 1
        correlation = getattr(message.properties, "CorrelationData", None)
        received = _Received(message.topic, message.head, message.mid, message.qos,
                             bytes(correlation) if correlation is not None else None,
                             self._arrivals)
        self._refusals.append(_Refusal(
            received, f"too large: {message.size} bytes (at most "
                      f"{self.config.uplink.max_inbound_bytes} are accepted)", message.size))

    def _receive(self, message: paho.MQTTMessage) -> None:
        received = _received(message, self._v5, self._arrivals)
        platform_id = platform_id_of(self._root, received.topic)
        if platform_id is not None:
            # Retained by design; an empty one is the instance's presence cleared.
            if not received.payload:
                self._presence_changed(self.presence.withdraw(platform_id))
                self._presence_done.append(received)
            elif len(self._unopened) >= MAX_UNOPENED:
                self._refusals.append(_Refusal(received, f"over {MAX_UNOPENED} messages "
                                                         "wait to be checked: refused unread"))
            else:
                self._unopened.append((received, PRESENCE, ""))
            return
        if message.retain:
            # Sent once, kept by the broker, replayed at every subscription: an
            # acknowledgement or a command must never be that.
            self._refusals.append(_Refusal(
                received, "retained message refused: acknowledgements and commands are sent "
                          "once (clear it with an empty retained message)"))
            return
        name = self.topics.command_of(received.topic)
        if received.topic != self.topics.ack and name is None:
            self._refusals.append(_Refusal(received, "not a topic this device reads"))
            return
        if len(self._unopened) >= MAX_UNOPENED:
            # Only messages sent at QoS 0 can pile up here (the broker sends no more QoS 1
            # ones than our Receive Maximum): a flood, refused without the dear check.
            self._refusals.append(_Refusal(received, f"over {MAX_UNOPENED} messages wait to "
                                                     "be checked: refused unread"))
            return
        reply_topic = _reply_topic(message, self.topics, name) if name is not None else ""
        self._unopened.append((received, name, reply_topic))

    def _open_some(self, deadline: float) -> None:
        """Check signatures until ``deadline`` (at least one message): a flood of forgeries
        costs each round of the loop a bounded time, and the round still publishes."""
        while self._unopened:
            received, name, reply_topic = self._unopened.popleft()
            try:
                self._open(received, name, reply_topic)
            except Exception as err:  # a defect of ours must not become a crash loop
                log.exception("a message could not be handled; it is rejected")
                self._refusals.append(_Refusal(
                    received, f"could not be handled ({type(err).__name__})"))
            if time.monotonic() >= deadline:
                return

    def pending(self) -> bool:
        """Messages still to be checked: the loop comes back at once for them."""
        return bool(self._unopened)

    def _open(self, received: _Received, name: str | None, reply_topic: str) -> None:
        if name == PRESENCE:
            self._open_presence(received)
            return
        try:
            opened = self.gate.open(received.payload, received.topic,
                                    "ack" if name is None else "command")
        except Rejected as err:
            self._refusals.append(_Refusal(received, f"not believed: {err.reason}"))
            return
        try:
            if name is None:
                self._acks.append((ack_from_body(opened.body), received, opened))
            else:
                # Say so if the command is unknown, not nothing: a platform newer than this
                # device learns it at once.
                command = command_from_body(name, opened.body)
                self._commands.append((command, reply_topic, received.correlation.hex()
                                       if received.correlation is not None else None,
                                       received, opened))
        except RejectedInput as err:
            # Signed, but not what the contract says: its nonce is spent all the same.
            self._refusals.append(_Refusal(received, str(err), request_id=err.request_id,
                                           event_id=err.event_id, opened=opened))

    def _open_presence(self, received: _Received) -> None:
        try:
            opened = open_envelope(received.payload, received.topic, self.gate.keyring, "ack",
                                   now=utc_now(), clock_synced=False, newest_accepted=None,
                                   seen_nonce=lambda nonce: False)
        except Rejected as err:
            self.gate.untrusted[err.kind] += 1
            self._refusals.append(_Refusal(received, f"not believed: {err.reason}"))
            return
        try:
            presence = presence_from_body(opened.body)
            if presence.platform_id != platform_id_of(self._root, received.topic):
                raise ValueError("platform_id is not the topic's")
        except ValueError as err:
            self._refusals.append(_Refusal(received, str(err)))
            return
        self._presence_changed(self.presence.offer(presence))
        self._presence_done.append(received)

    def _presence_changed(self, changed: bool) -> None:
        if not changed:
            return
        summary = self.presence.summary()
        if summary["state"] == "offline":
            log.warning("the platform is offline (%s): alarms go by SMS at once",
                        ", ".join(f"{k} {v}" for k, v in sorted(summary["instances"].items())))
        else:
            log.info("the platform's presence: %s", summary["state"])

    # -- the loop --------------------------------------------------------------------------

    def settle(self, client: paho.Client, outbox: Outbox, resend: Resend, now: float) -> bool:
        """Commit what arrived, then acknowledge it to the broker; answer rejections.
        Returns True when acknowledgements were recorded (the button's LED shows them)."""
        recorded = False
        self._open_some(time.monotonic() + OPEN_BUDGET_S)
        if now >= self._retry_at:
            try:
                self._refuse_replays(outbox)
                recorded = self._settle_acks(client, outbox, resend)
                self._settle_commands(client, outbox, now)
                self._settle_refusals(outbox)
            except STORAGE_ERRORS as err:
                self._retry_at = now + RETRY_S
                log.error("could not record what the platform sent (%s): it is not "
                          "acknowledged to the broker; trying again in %.0f s", err, RETRY_S)
        for received in self._presence_done:
            client.ack(received.mid, received.qos)
        self._presence_done.clear()
        for command, ticket, answer in self.commands.finished():
            self._reply_command(command, ticket, answer)
        refusals = [r for r in self._refusals if r.opened is None]
        self._refusals = [r for r in self._refusals if r.opened is not None]
        for refusal in sorted(refusals, key=lambda r: r.received.order):
            client.ack(refusal.received.mid, refusal.received.qos)  # it must not come back
            self.counts["rejected"] += 1
            self._answer(refusal, now)
        return recorded

    def _refuse_replays(self, outbox: Outbox) -> None:
        """Signed messages whose nonce an earlier run accepted: replays (or the broker's
        second delivery of a message acted on just before a restart)."""
        opened = [item[-1] for item in (*self._acks, *self._commands)]
        if not opened:
            return
        replayed = self.gate.replays(outbox, opened)
        if not replayed:
            return
        reason = "not believed: nonce already used (a replay, or the same message delivered again)"
        for pending in (self._acks, self._commands):
            for item in [i for i in pending if i[-1].nonce in replayed]:
                pending.remove(item)
                self.gate.settled([item[-1]])
                self._refusals.append(_Refusal(item[-2], reason))

    def _settle_refusals(self, outbox: Outbox) -> None:
        """Signed messages refused for their content: their nonces are spent too."""
        spent = [r.opened for r in self._refusals if r.opened is not None]
        self.gate.record(outbox, spent)
        self._refusals = [replace(r, opened=None) for r in self._refusals]

    def _settle_acks(self, client: paho.Client, outbox: Outbox, resend: Resend) -> bool:
        if not self._acks:
            return False
        try:
            results = outbox.mark_acknowledged(
                [(ack.event_id, ack.acknowledged_at or utc_now(), ack.by)
                 for ack, _, _ in self._acks],
                [(o.nonce, o.key_id, o.signed_at) for _, _, o in self._acks])
        except STORAGE_ERRORS:
            raise
        except Exception:  # a defect of ours: isolate the message it concerns
            if len(self._acks) > 1:
                pending, recorded = self._acks, False
                for index, one in enumerate(pending):
                    self._acks = [one]
                    try:
                        recorded |= self._settle_acks(client, outbox, resend)
                    except STORAGE_ERRORS:
                        self._acks = pending[index:]
                        raise
                return recorded
            log.exception("an acknowledgement could not be recorded; it is rejected")
            [(ack, received, opened)] = self._acks
            self._acks = []
            self._refusals.append(_Refusal(received, "could not be recorded",
                                           event_id=ack.event_id, opened=opened))
            return False
        acks, self._acks = self._acks, []
        self.gate.settled(o for _, _, o in acks)
        for (ack, received, _), result in zip(acks, results, strict=True):
            if not result.known:
                # Durably nothing to do: refused with the others (it is acknowledged then).
                self._refusals.append(_Refusal(received, f"unknown event id {ack.event_id}",
                                               event_id=ack.event_id))
                continue
            self.counts["accepted"] += 1
            if not result.already:
                log.info("platform acknowledged event %s%s", ack.event_id,
                         f" ({ack.by})" if ack.by else "")
            client.ack(received.mid, received.qos)  # only now: the acknowledgement is durable
        resend.acknowledged(ack.event_id for ack, _, _ in acks)
        return True

    def _settle_commands(self, client: paho.Client, outbox: Outbox, now: float) -> None:
        while self._commands:
            command, reply_topic, correlation, received, opened = self._commands[0]
            try:
                if isinstance(command, TestRequest):
                    self._take_test(outbox, command, reply_topic, correlation, now)
                else:
                    ticket = {"reply_topic": reply_topic, "correlation": correlation}
                    answer = self.commands.take(outbox, command, now, ticket)
                    self.counts["accepted"] += answer.status in ("accepted", "done")
                    self._reply_command(command, ticket, answer)
            except STORAGE_ERRORS:
                raise  # ours: tried again, not acknowledged meanwhile
            except Exception:  # a defect of ours must not become a crash loop
                log.exception("cmd/%s could not be handled; it is rejected",
                              "test" if isinstance(command, TestRequest) else command.name)
                self._commands.pop(0)
                self._refusals.append(_Refusal(received, "could not be handled",
                                               request_id=command.request_id, opened=opened))
                continue
            # Done: its nonce is spent (a second delivery is refused as a replay; the
            # test's request id makes one harmless even if this write is lost).
            self.gate.record(outbox, [opened])
            self._commands.pop(0)
            client.ack(received.mid, received.qos)  # only now: the request is durable

    def connection_lost(self) -> None:
        """What was not acknowledged to the broker will be delivered again: forget it (its
        message ids belong to the connection that ended)."""
        self._acks.clear()
        self._commands.clear()
        self._refusals.clear()
        self._unopened.clear()
        self._presence_done.clear()
        self.presence.forget()   # the broker sends the retained presence again
        self.gate.forget_pending()
        self._retry_at = 0.0

    # -- the platform's tests --------------------------------------------------------------

    def _take_test(self, outbox: Outbox, command: TestRequest, reply_topic: str,
                   correlation: str | None, now: float) -> None:
        """The police's linked test: recorded, handed to the self-test daemon, and
        answered twice: ``accepted`` now, the result when it is known."""
        request = {"request_id": command.request_id, "reply_topic": reply_topic,
                   "correlation": correlation, "by": command.by}
        same = outbox.alarm_tests.by_platform_request(
            command.request_id, utc_now() - timedelta(hours=REQUEST_ID_MEMORY_H))
        if same is not None:
            # The broker sends a command again when our PUBACK was lost (a dropped link, a
            # restart), and a platform may ask again: the same request, the same test,
            # never a second pulse. Answered where the new request asks, the result too.
            log.info("platform test request %s again: it is test %s (%s)",
                     command.request_id, same.id, same.state)
            outbox.alarm_tests.asked_again(same.id, request,
                                           result_again=same.state in ("passed", "failed"))
            self._reply(request, "accepted", test_id=same.id)
            return
        wait = self._tests_not_before - now
        if wait > 0:
            interval = self.config.alarm_test.min_interval_s
            self._refuse_test(request, f"platform tests run at most once every {interval:g} s",
                              now, retry_after_s=wait)
            return
        waiting = outbox.alarm_tests.waiting()
        if waiting >= MAX_WAITING_TESTS:
            self._refuse_test(request, f"{waiting} tests are already waiting to run", now)
            return
        test_id = request_test(outbox, "platform", request=request)
        self._tests_not_before = now + self.config.alarm_test.min_interval_s
        log.info("platform requested an alarm test (request %s%s): test %s",
                 command.request_id, f" by {command.by}" if command.by else "", test_id)
        wake(self.config.storage.runtime_dir, "selftest")
        self.counts["accepted"] += 1
        self._reply(request, "accepted", test_id=test_id)

    def _refuse_test(self, request: dict, reason: str, now: float, **fields) -> None:
        self.counts["refused"] += 1
        log.info("platform test request %s refused: %s", request["request_id"], reason)
        if self._bucket.take(now):
            self._reply(request, "refused", reason=reason, **fields)
        else:
            self.counts["unanswered"] += 1

    def _reply(self, request: dict, status: str, **fields) -> None:
        self.lane.add(SideMessage(request["reply_topic"], reply_payload(
            self.config.identity, command="test", request_id=request["request_id"],
            status=status, **fields), self.reply_properties(request), reply=True))

    def _reply_command(self, command: Command, ticket: dict, answer: Answer) -> None:
        """Answer a command other than the test (a first answer, or a later one) where
        its ``ticket`` says: the reply topic and correlation data of the request."""
        if answer.status in ("refused", "failed"):
            self.counts["refused"] += answer.status == "refused"
            log.info("cmd/%s %s %s: %s", command.name, command.request_id, answer.status,
                     answer.fields.get("reason"))
        self.lane.add(SideMessage(ticket["reply_topic"], reply_payload(
            self.config.identity, command=command.name, request_id=command.request_id,
            status=answer.status, **answer.fields), self.reply_properties(ticket), reply=True))

    def reply_properties(self, request: dict) -> Properties | None:
        """MQTT 5: JSON, with the request's correlation data."""
        correlation = request.get("correlation")
        return self._json_properties(bytes.fromhex(correlation) if correlation else None)

    def _json_properties(self, correlation: bytes | None) -> Properties | None:
        if not self._v5:
            return None
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        if correlation is not None:
            props.CorrelationData = correlation
        return props

    # -- rejections ------------------------------------------------------------------------

    def _answer(self, refusal: _Refusal, now: float) -> None:
        """Answer on ``rejected`` if the rate allows, else count it for the summary."""
        received = refusal.received
        if self._bucket.take(now) and self.lane.add(SideMessage(
                self.topics.rejected, rejection_payload(
                    received.topic, refusal.reason, received.payload, size=refusal.size,
                    request_id=refusal.request_id, event_id=refusal.event_id,
                    suppressed=self._suppressed),
                self._json_properties(received.correlation))):
            log.warning("rejected a message on %s: %s", received.topic, refusal.reason)
            self._suppressed, self._suppressed_last = 0, None
            return
        self._suppressed += 1
        self.counts["unanswered"] += 1
        self._suppressed_last = (received.topic, refusal.reason)
        log.debug("rejected a message on %s without answering (rate limit): %s",
                  received.topic, refusal.reason)

    def summarise(self, now: float) -> None:
        """Once the rate allows, one answer for the rejections not answered one by one."""
        if not self._suppressed or not self._bucket.take(now):
            return
        topic, reason = self._suppressed_last
        summary = (f"{self._suppressed} message(s) refused without an answer each (rate "
                   f"limit); the last: {reason}")
        if self.lane.add(SideMessage(self.topics.rejected, rejection_payload(
                topic, summary, b"", suppressed=self._suppressed), self._json_properties(None))):
            log.warning("%s", summary)
            self._suppressed, self._suppressed_last = 0, None


def _received(message: paho.MQTTMessage, v5: bool, order: int) -> _Received:
    """The parts of a message that are always readable (a topic that is not UTF-8, which a
    broker should never pass, is shown with replacement characters)."""
    raw_topic = message._topic  # paho raises on .topic for invalid UTF-8
    topic = raw_topic.decode("utf-8", "replace") if isinstance(raw_topic, bytes) else raw_topic
    correlation = None
    if v5 and message.properties is not None:
        correlation = getattr(message.properties, "CorrelationData", None)
    return _Received(topic, bytes(message.payload), message.mid, message.qos,
                     bytes(correlation) if correlation is not None else None, order)


def _reply_topic(message: paho.MQTTMessage, topics: Topics, command: str) -> str:
    """Where the answers go: the request's MQTT 5 Response Topic if it lies under our
    ``reply/`` (the only place the broker's ACL lets a device write answers), else
    ``reply/{command}``."""
    props = getattr(message, "properties", None)
    topic = getattr(props, "ResponseTopic", None) if props else None
    if (not topic or not topic.startswith(topics.below("reply/"))
            or any(c in topic for c in "+#\x00")):
        topic = topics.reply(command)
    return topic
