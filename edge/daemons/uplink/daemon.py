"""The uplink daemon (``guardpost run uplink``): drains the outbox to the platform's broker.

One thread, one ``select`` over the MQTT socket and the wake-up socket, with paho's
external-loop API (``loop_read``/``loop_write``/``loop_misc``): no locks, and an alarm
committed by the button daemon is published as soon as its wake-up arrives. This module
wires the parts into that loop:

    connection.py    when to connect (an alarm waiting: at once), the attempt on a
                     helper thread, timeouts that grow on a slow link, a dead link
    window.py        the publish window: priority order, the cursor, PUBACKs
    resend.py        alarms and tests the platform has not acknowledged, published again
    inbound.py       what the broker delivers, each message in isolation
    lane.py          answers and rejections, below every event, rate-limited
    housekeeping.py  the heartbeat, test results, pruning
    linkstate.py     the link's state for the fallback daemon, in the runtime directory

- A row is marked ``sent`` only on the broker's PUBACK, and ``acknowledged`` only when the
  platform's acknowledgement has been committed; only then is the acknowledgement itself
  PUBACKed (manual acks), so a crash between the two loses nothing. Delivery is at least
  once, de-duplicable by event id.
- Retained ``status``: a birth after every connect and a will, both carrying the same
  session counter; ``offline`` on a clean stop. Retained ``health`` heartbeat.
"""

from __future__ import annotations

import contextlib
import logging
import time

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge import __version__
from edge.config import Config
from edge.contract.events import utc_iso, utc_now
from edge.contract.messages import Topics, dark_after_s, status_payload
from edge.daemons.uplink.connection import Backoff, Connection, Phase
from edge.daemons.uplink.housekeeping import Housekeeping
from edge.daemons.uplink.inbound import RECEIVE_MAXIMUM, Inbound
from edge.daemons.uplink.lane import SideLane
from edge.daemons.uplink.linkstate import LinkStateFile
from edge.daemons.uplink.resend import Resend
from edge.daemons.uplink.window import MARK_BATCH, InFlight, PublishWindow
from edge.runtime.clock import boot_id
from edge.runtime.daemon import Daemon
from edge.runtime.mqtt import PackedProperties, connect, is_v5, make_client
from edge.runtime.wake import Waker, wake
from edge.store.outbox import Outbox
from edge.store.snapshots import SnapshotStore

__all__ = ["MARK_BATCH", "Backoff", "InFlight", "UplinkDaemon"]

log = logging.getLogger(__name__)

RESERVED_IN_FLIGHT = 2      # birth/offline and heartbeat may be in flight beside the window
SHUTDOWN_FLUSH_S = 2.0
LOOP_TICK_S = 1.0           # paho's keepalive bookkeeping wants a call at least this often
UNHEARD = "PUBACK 0x10 No matching subscribers"
FAILURE_SAVE_EVERY_S = 60.0  # the state after failed connection attempts, at most this often


class UplinkDaemon(Daemon):
    """Publishes the outbox and takes the platform's acknowledgements and commands."""

    name = "uplink"
    alarm_path = True  # records or delivers alarms: may write from the alarm reserve

    def __init__(self, config: Config):
        super().__init__(config)
        self.topics = Topics(config.topic_prefix)
        up = config.uplink
        self.client = make_client(config.broker, config.client_id, persistent=True,
                                  max_inbound=up.max_inbound_bytes)
        self.resend = Resend(up.republish_after_s, up.republish_max_s)
        self.lane = SideLane()
        self.inbound = Inbound(config, self.topics, self.lane)
        self.housekeeping = Housekeeping(config, self.topics, self.lane,
                                         self.inbound.reply_properties, self._health_extras)
        self.connection: Connection | None = None
        self.window: PublishWindow | None = None
        self._pubacks: list[tuple[int, int, str]] = []   # (mid, reason code, reason)
        self._last_puback = 0.0
        self._session = 0
        self._connected_at: str | None = None
        self._last_error: str | None = None
        self._failure_saved = float("-inf")
        self._stopping = False
        self._outbox: Outbox | None = None
        self._link: LinkStateFile | None = None
        self._props: PackedProperties | None = None
        self._platform_saved: dict | None = None

    # -- main loop -------------------------------------------------------------------------

    def start(self, stack: contextlib.ExitStack) -> str:
        cfg = self.config
        outbox = self._outbox = self.open_outbox(stack)
        self._link = stack.enter_context(contextlib.closing(
            LinkStateFile(cfg.storage.runtime_dir)))
        self._assemble(outbox, self.waker)
        now = time.monotonic()
        self.resend.load(outbox, now)
        self.inbound.start(outbox, now)
        self._save_state()
        self._link.update(False)
        log.info("uplink ready: broker %s:%d%s (MQTT %s%s), window %d", cfg.broker.host,
                 cfg.broker.port, f" and {len(cfg.broker.alternates)} alternate(s)"
                 if cfg.broker.alternates else "", cfg.broker.protocol,
                 ", TLS" if cfg.broker.tls else "", self.window.size)
        return f"uplink to {cfg.broker.host}:{cfg.broker.port}"

    def step(self) -> int | None:
        """One turn: wait for the next attempt, for the attempt, or for the network (each
        at most LOOP_TICK_S, and cut short by a wake-up), then act on what came."""
        outbox, waker, now = self._outbox, self.waker, time.monotonic()
        self._link.update(self.connection.up, now, platform=self.inbound.presence.state)
        if self.connection.phase is Phase.DOWN:
            self._while_down(outbox, waker, now)
        elif self.connection.phase is Phase.CONNECTING:
            self._while_connecting(waker, now)
        else:
            self._round(outbox, waker, now)
        self.housekeeping.prune_when_due(now)
        if (platform := self.inbound.presence.summary()) != self._platform_saved:
            self._platform_saved = platform   # for guardpost status, at once
            self._save_state()
        return None

    def wait(self, timeout: float) -> bool:
        return False  # the turn itself waited, on the network and the wake-up socket

    def stopping(self) -> None:
        self._shutdown(self._outbox)

    def _assemble(self, outbox: Outbox, waker: Waker) -> None:
        cfg = self.config
        snapshots = SnapshotStore(outbox, cfg.storage.spool_dir,
                                  cfg.storage.spool_budget_mb * 1024 * 1024)
        self.window = PublishWindow(cfg, self.topics, snapshots, self.resend, self._wake_button)
        self.connection = Connection(cfg, self.client, waker.wake)
        client = self.client
        # (paho refuses to change this once it has connected, even after a connection
        # loss, so the broker's Receive Maximum is honoured by our own window instead.)
        client.max_inflight_messages_set(self.window.size + RESERVED_IN_FLIGHT)
        client.max_queued_messages_set(0)
        client.manual_ack_set(True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self.inbound.on_message
        client.on_oversized = self.inbound.on_oversized

    def _while_down(self, outbox: Outbox, waker: Waker, now: float) -> None:
        """Wait for the next attempt; an alarm or test committed meanwhile cuts it short."""
        wait = self.connection.due_in(now, urgent=outbox.urgent_queued())
        if wait <= 0:
            self._open(outbox)
            return
        if waker.wait(min(wait, LOOP_TICK_S)):
            self.window.restart_walk()
            if outbox.urgent_queued():
                self.connection.hurry(time.monotonic())

    def _while_connecting(self, waker: Waker, now: float) -> None:
        """The helper thread is connecting; it wakes the loop when it is done."""
        if self.connection.attempting:
            if waker.wait(LOOP_TICK_S):
                self.window.restart_walk()
            return
        now = time.monotonic()
        error = self.connection.finish_attempt(now)
        if error is not None:
            cfg = self.config.broker
            message = f"cannot connect to {cfg.host}:{cfg.port}: {error}"
            # A long outage is thousands of failed attempts a day: the state is written
            # when the error changes, or once a minute, not at every one (SD card wear).
            if message != self._last_error or now - self._failure_saved >= FAILURE_SAVE_EVERY_S:
                self._note_error(message)
                self._save_state()
                self._failure_saved = now

    def _round(self, outbox: Outbox, waker: Waker, now: float) -> None:
        """One round while a connection is open: the network, then what it brought, then
        what can be published."""
        client = self.client
        if client.socket() is None:  # closed by paho without a word (a failed write)
            self._lost("the connection closed")
            return
        if self.connection.pump(waker, self._select_timeout(now)):
            self.window.restart_walk()  # something was committed: it may outrank the cursor
        now = time.monotonic()
        self._settle(outbox, now)
        if self.connection.up:
            self.housekeeping.chores(client, outbox, self._session, now, self._json_props())
            self.inbound.summarise(now)
            free = self.window.fill(client, outbox, now, others=len(self.lane.inflight))
            self.lane.publish(client, free)
        self._check_link(time.monotonic())

    def _select_timeout(self, now: float) -> float:
        """How long the loop may wait for the network before it has work of its own."""
        connection = self.connection
        if self.inbound.pending():
            return 0.0  # signatures still to check, a few each round
        times = [LOOP_TICK_S]
        if connection.phase is Phase.HANDSHAKE:
            times.append(connection.connack_deadline - now)
        elif connection.up:
            times.append(self.housekeeping.next_heartbeat - now)
            room = self.window.free(len(self.lane.inflight)) > 0
            times.append(self.window.next_due(now, room=room))
            if (urgent := self.window.oldest_urgent()) is not None:
                times.append(max(urgent, self._last_puback) + connection.puback_timeout() - now)
        return max(0.0, min(times))

    def _settle(self, outbox: Outbox, now: float) -> None:
        """Commit what the last round brought: PUBACKs, acknowledgements, commands,
        rejections."""
        pubacks, self._pubacks = self._pubacks, []
        for mid, code, reason in pubacks:
            self._last_puback = now
            if self.housekeeping.acked(mid, now):
                self._save_state()
            elif not self.window.acked(mid, code, reason, now):
                message = self.lane.acked(mid)
                if message is not None:
                    self.housekeeping.reply_acked(message, code, reason, outbox)
        self.window.settle(outbox, now)
        self._show_unheard()
        if self.inbound.settle(self.client, outbox, self.resend, now):
            self._wake_button()  # its LED: "police received it"

    def _check_link(self, now: float) -> None:
        """A broker that does not answer: no CONNACK in time, or no PUBACK for an alarm."""
        connection = self.connection
        if connection.connack_overdue(now):
            self._drop(f"no CONNACK from the broker in {connection.timeout.current:.1f} s",
                       timed_out=True)
        elif connection.stalled(now, self.window.oldest_urgent(), self._last_puback):
            self._drop(f"no PUBACK for an alarm or test in {connection.puback_timeout():.1f} s:"
                       " the link is dead", timed_out=True)
            connection.hurry(now)  # the alarm is still waiting

    def _drop(self, reason: str, *, timed_out: bool) -> None:
        """Give up the connection without a DISCONNECT (which would discard our will: the
        platform should learn that we went)."""
        log.warning("%s; reconnecting", reason)
        self._note_error(reason)
        with contextlib.suppress(OSError):
            self.client._sock_close()  # the external-loop API has no public close
        self._lost(reason, timed_out=timed_out, explained=True)

    # -- connection --------------------------------------------------------------------------

    def _open(self, outbox: Outbox) -> None:
        """Start a connection attempt on the helper thread."""
        cfg = self.config
        if self.connection.reached_broker:
            # A new session number for each attempt that reaches the broker (its will
            # carries it); an attempt that never got there leaves its number unused.
            with outbox.transaction():
                self._session = outbox.next_counter("mqtt_session")
        will = Properties(PacketTypes.WILLMESSAGE) if is_v5(cfg.broker) else None
        if will is not None:
            will.ContentType = "application/json"
        self.client.will_set(self.topics.status, status_payload(
            self.identity, state="offline", session=self._session, reason="connection lost"),
            qos=1, retain=True, properties=will)
        broker = cfg.broker.at(*self.connection.endpoint)
        self.connection.start(lambda: connect(self.client, broker, persistent=True,
                                              max_inbound=cfg.uplink.max_inbound_bytes,
                                              receive_maximum=RECEIVE_MAXIMUM))

    def _note_error(self, message: str) -> None:
        if message != self._last_error:
            log.warning("%s", message)
        else:
            log.debug("%s", message)
        self._last_error = message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._note_error(f"broker refused the connection: {reason_code}")
            return
        now = time.monotonic()
        outbox = self._outbox
        self.connection.connected(now)
        self._connected_at = utc_iso(utc_now())
        self._last_error = None
        window = self.config.uplink.inflight_window
        receive_maximum = getattr(properties, "ReceiveMaximum", None) if properties else None
        max_packet = getattr(properties, "MaximumPacketSize", None) if properties else None
        if receive_maximum:
            # The status and heartbeat publishes are outside the window: leave them room
            # so that the broker never has more in flight from us than it allows.
            window = max(1, min(window, receive_maximum - RESERVED_IN_FLIGHT))
        self.window.connected(window, max_packet, now)
        log.info("connected to %s (session %d, %s, window %d, round trip %.0f ms)",
                 self.connection.describe_endpoint(), self._session,
                 "resumed" if flags.session_present else "new broker session", window,
                 self.connection.round_trip * 1000)
        # Published from inside the callback so the birth precedes paho's re-sends.
        cfg_uplink = self.config.uplink
        client.publish(self.topics.status, status_payload(
            self.identity, state="online", session=self._session, version=__version__,
            config=self.config.fingerprint(), boot_id=boot_id(),
            protocol=self.config.broker.protocol, connected_at=self._connected_at,
            epoch=self._outbox.epoch, last_seq=self._outbox.last_seq(),
            heartbeat_interval_s=cfg_uplink.heartbeat_interval,
            keepalive_s=self.config.broker.keepalive,
            dark_after_s=dark_after_s(self.config)),
            qos=1, retain=True, properties=self._json_props())
        if is_v5(self.config.broker):
            # A retained acknowledgement or command would be replayed at every
            # subscription: ask the broker never to send one (refused anyway if it does).
            options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            client.subscribe([(self.topics.ack, options), (self.topics.commands, options),
                              (self.topics.presence, SubscribeOptions(qos=1))])
        else:
            client.subscribe([(self.topics.ack, 1), (self.topics.commands, 1),
                              (self.topics.presence, 1)])
        outbox.sessions.started(self._session)
        if not flags.session_present:
            # The broker kept nothing of ours: whatever it took and had not delivered to
            # the platform may be gone with it.
            again = self.resend.session_lost(now)
            if again:
                log.info("the broker had no session for us: %d unacknowledged alarm(s) "
                         "and test(s) are published again", again)
        self.housekeeping.heartbeat(client, outbox, self._session, now, self._json_props())
        self._save_state()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connection.phase is Phase.CONNECTING:
            return  # (on the helper thread: the attempt failed; the loop sees to it)
        self._lost(str(reason_code))

    def _lost(self, reason: str, *, timed_out: bool = False, explained: bool = False) -> None:
        """The connection (or the attempt at its handshake) ended, however it was noticed."""
        phase = self.connection.phase
        if phase is Phase.DOWN:
            return
        was_up = self.connection.lost(time.monotonic(), timed_out=timed_out)
        self.inbound.connection_lost()
        self.housekeeping.connection_lost()
        if was_up:
            self._outbox.sessions.ended(self._session, "shutdown" if self._stopping else reason)
        if self._stopping:
            return
        if was_up and not explained:
            self._note_error(f"disconnected from the broker: {reason}")
        if was_up:
            log.info("%d message(s) in flight will be re-sent on reconnect",
                     len(self.window.inflight))
        elif not explained and not (self._last_error or "").startswith("broker refused"):
            # With TLS 1.3 a missing or rejected client certificate shows up only here.
            self._note_error(f"the broker closed the connection before accepting it "
                             f"({reason}); check credentials and certificates")
        self._save_state()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._pubacks.append((mid, getattr(reason_code, "value", 0), str(reason_code)))

    # -- what others see ---------------------------------------------------------------------

    def _json_props(self) -> PackedProperties | None:
        """The MQTT 5 properties of the status and heartbeat: built and encoded once."""
        if not is_v5(self.config.broker):
            return None
        if self._props is None:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = "application/json"
            self._props = PackedProperties.of(props)
        return self._props

    def _health_extras(self) -> dict:
        return {"inbound": self.inbound.health(), "delivery": self.window.stats(),
                "broker": self.connection.describe_endpoint(),
                "platform": self.inbound.presence.summary()}

    def _show_unheard(self) -> None:
        """Nobody subscribes: say so where ``guardpost status`` looks, until it changes."""
        unheard = self.window.unheard_topic is not None
        shown = (self._last_error or "").startswith(UNHEARD)
        if unheard and not shown:
            self._last_error = (f"{UNHEARD}: nobody subscribes to this device's events; "
                                "they are held and tried again")
            self._save_state()
        elif shown and not unheard:
            self._last_error = None
            self._save_state()

    def _wake_button(self) -> None:
        wake(self.config.storage.runtime_dir, "button")

    def _save_state(self) -> None:
        cfg = self.config
        state = {
            "daemon": self.name, "version": __version__, "connected": self.connection.up,
            "phase": str(self.connection.phase),
            "broker": self.connection.describe_endpoint(), "protocol": cfg.broker.protocol,
            "brokers": len(self.connection.endpoints),
            "tls": cfg.broker.tls is not None, "session": self._session,
            "connected_at": self._connected_at, "last_error": self._last_error,
            "in_flight": len(self.window.inflight), "window": self.window.size,
            "heartbeat_interval": cfg.uplink.heartbeat_interval,
            "broker_rtt_ms": self.housekeeping.broker_rtt_ms,
            "rtt_at": self.housekeeping.rtt_at,
            "connect_timeout_s": self.connection.timeout.current,
            "delivery": self.window.stats(), "inbound": self.inbound.health(),
            "platform": self.inbound.presence.summary(),
        }
        self.save_state(self._outbox, state)

    def _shutdown(self, outbox: Outbox) -> None:
        """Say goodbye properly: a retained offline status, then DISCONNECT."""
        self._stopping = True
        self.connection.wait_for_attempt(SHUTDOWN_FLUSH_S)
        client = self.client
        if self.connection.up:
            info = client.publish(self.topics.status, status_payload(
                self.identity, state="offline", session=self._session, reason="shutdown"),
                qos=1, retain=True, properties=self._json_props())
            deadline = time.monotonic() + SHUTDOWN_FLUSH_S
            while (not info.is_published() and client.socket() is not None
                   and time.monotonic() < deadline):
                self.connection.pump(self.waker, 0.1)
            self._settle(outbox, time.monotonic())
        self.window.flush_marks(outbox)
        if self.connection.up:
            client.disconnect()
            with contextlib.suppress(OSError):
                client.loop_write()
        with contextlib.suppress(OSError):
            client._sock_close()
        self._lost("shutdown", explained=True)
        self._save_state()
        self.housekeeping.stop()
        log.info("uplink stopped")
