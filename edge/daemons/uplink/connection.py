"""The connection to the broker: when to connect, the attempt itself, when to give a link up.

- **When.** A jittered backoff, doubling from ``reconnect_min`` to ``reconnect_max``,
  protects the broker from a fleet reconnecting in step. It is not allowed to make an
  alarm wait: while an alarm or a test waits to be published, attempts are at most
  ``alarm_reconnect_s`` apart, and a new one starts an attempt at once (it used to wait
  out the backoff: 27 s after a 25 s outage, 128 s with a flapping broker).
- **The attempt** (TCP connect, TLS handshake, CONNECT) runs on a helper thread, so the
  loop goes on pinging the watchdog and taking wake-ups while a slow link answers.
- **Timeouts** (connect, TLS, CONNACK) start at ``broker.connect_timeout`` and double at
  every timeout up to ``connect_timeout_max``: a link whose round trip is longer than the
  configured timeout (a 4G modem in poor signal) still connects. A connection that is
  made sets them from its own round trip.
- **Where.** ``broker.host`` first, then ``broker.alternates`` in order: every failed
  attempt and every lost link moves to the next broker, round the list. A connection
  that works is kept (no flapping back to the primary while an alternate serves); a new
  broker has no session of ours, and the daemon then publishes again whatever the
  platform has not acknowledged, in sequence order.
- **A dead link.** An alarm or test without a PUBACK for ``puback_timeout_s`` (or twice
  the link's round trip), with no other PUBACK meanwhile, means a half-open link: it is
  dropped and a new one made. Keepalive alone would take about two keepalives.
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import threading
from collections.abc import Callable
from enum import StrEnum

import paho.mqtt.client as paho

from edge.config import Config

log = logging.getLogger(__name__)

STABLE_CONNECTION_S = 10.0  # a connection that lasted this long resets the reconnect backoff
MIN_ATTEMPT_GAP_S = 0.05    # even for a new alarm, attempts are at least this far apart


class Phase(StrEnum):
    DOWN = "disconnected"
    CONNECTING = "connecting"        # the helper thread: TCP, TLS, CONNECT
    HANDSHAKE = "awaiting CONNACK"
    UP = "connected"


class Backoff:
    """Exponential reconnect delay with jitter, so a fleet does not reconnect in step."""

    def __init__(self, first: float, cap: float, rng=random.random):
        self.first, self.cap, self._rng = first, cap, rng
        self.attempt = 0

    def next_delay(self) -> float:
        # The exponent stops growing once the cap is reached: 2 ** 1024 is not a float,
        # and an outage of a few hours counts more than a thousand attempts.
        ceiling = min(self.cap, self.first * 2 ** min(self.attempt, 60))
        self.attempt += 1
        return ceiling / 2 + self._rng() * ceiling / 2  # "equal jitter": half fixed, half random

    def reset(self) -> None:
        self.attempt = 0


class AdaptiveTimeout:
    """A timeout that doubles when it expires, and learns from a round trip that worked."""

    def __init__(self, base: float, cap: float):
        self.base, self.cap = base, max(base, cap)
        self.current = base

    def expired(self) -> None:
        self.current = min(self.cap, self.current * 2)

    def learn(self, round_trip: float) -> None:
        self.current = min(self.cap, max(self.base, 3 * round_trip))


class Connection:
    """The state of the link, and the decisions about it. The daemon's loop drives it."""

    def __init__(self, config: Config, client: paho.Client, wake_loop: Callable[[], None],
                 rng=random.random):
        up = config.uplink
        self.config = config
        self.client = client
        self._wake_loop = wake_loop
        self._rng = rng
        self.backoff = Backoff(up.reconnect_min, up.reconnect_max, rng)
        self.timeout = AdaptiveTimeout(config.broker.connect_timeout, up.connect_timeout_max)
        self.phase = Phase.DOWN
        self.next_attempt = 0.0               # monotonic: the backoff's next attempt
        self._last_attempt = -1e9             # when the last attempt ended
        self._urgent_gap = self._jittered_urgent_gap()
        self.round_trip: float | None = None  # CONNECT -> CONNACK of this connection
        self.connected_since = 0.0
        self.reached_broker = True            # the last attempt sent a CONNECT
        self._handshake_started = 0.0
        self.connack_deadline: float | None = None
        self._attempt: threading.Thread | None = None
        self._attempt_done = threading.Event()
        self._outcome: BaseException | None = None
        self.endpoints = config.broker.endpoints
        self.endpoint_index = 0

    @property
    def endpoint(self) -> tuple[str, int]:
        """The broker the next (or the current) connection is with."""
        return self.endpoints[self.endpoint_index]

    def describe_endpoint(self) -> str:
        host, port = self.endpoint
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if len(self.endpoints) == 1:
            return where
        role = "primary" if self.endpoint_index == 0 else f"alternate {self.endpoint_index}"
        return f"{where} ({role} of {len(self.endpoints)})"

    @property
    def up(self) -> bool:
        return self.phase is Phase.UP

    def _jittered_urgent_gap(self) -> float:
        gap = self.config.uplink.alarm_reconnect_s
        return gap / 2 + self._rng() * gap / 2

    # -- when ------------------------------------------------------------------------------

    def due_in(self, now: float, urgent: bool) -> float:
        """Seconds until the next attempt (0: now); ``urgent``: an alarm or test waits."""
        when = self.next_attempt
        if urgent:
            when = min(when, self._last_attempt + self._urgent_gap)
        return max(0.0, when - now)

    def hurry(self, now: float) -> None:
        """A new alarm or test while down: try at once."""
        self.next_attempt = min(self.next_attempt,
                                max(now, self._last_attempt + MIN_ATTEMPT_GAP_S))

    # -- the attempt -----------------------------------------------------------------------

    def start(self, connect: Callable[[], None]) -> None:
        """Run ``connect`` (paho's blocking connect) on a helper thread; the loop hears of
        its end through its wake-up and then calls :meth:`attempt_finished`."""
        # (paho's setter refuses while its state still says "connecting" or "connected",
        # which it does after a failed attempt or a link we dropped ourselves.)
        self.client._connect_timeout = self.timeout.current
        self.phase = Phase.CONNECTING
        self._outcome = None
        self._attempt_done.clear()

        def attempt() -> None:
            try:
                connect()
            except BaseException as err:  # handed to the loop, which reports it
                self._outcome = err
            self._attempt_done.set()
            self._wake_loop()

        self._attempt = threading.Thread(target=attempt, name="uplink-connect", daemon=True)
        self._attempt.start()

    @property
    def attempting(self) -> bool:
        """The helper thread is still connecting."""
        return self._attempt is not None and not self._attempt_done.is_set()

    def finish_attempt(self, now: float) -> BaseException | None:
        """After the helper: None (the socket is open, CONNECT sent, CONNACK awaited) or
        the error that ended the attempt."""
        self._attempt.join()
        self._attempt = None
        error = self._outcome
        self.reached_broker = error is None
        if error is None:
            with contextlib.suppress(OSError, AttributeError):
                # Alarms are single small packets: send each at once, never held back by
                # Nagle's algorithm waiting for the broker's TCP acknowledgement.
                self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.phase = Phase.HANDSHAKE
            self._handshake_started = now
            self.connack_deadline = now + self.timeout.current
        else:
            if isinstance(error, TimeoutError):
                self.timeout.expired()
            self._down(now)
        return error

    def wait_for_attempt(self, timeout: float) -> None:
        """At shutdown: let a helper that is still connecting end (it cannot be cut)."""
        if self._attempt is not None:
            self._attempt.join(timeout)

    # -- the link's life -------------------------------------------------------------------

    def pump(self, waker, timeout: float) -> bool:
        """One round of network I/O, the way paho's own loop() does it; True if the
        wake-up socket was readable (something was committed)."""
        client = self.client
        sock = client.socket()
        if sock is None:
            return False
        pending = sock.pending() if hasattr(sock, "pending") else 0  # TLS-buffered bytes
        wlist = [sock] if client.want_write() else []
        readable, writable, _ = select.select([sock, waker], wlist, [], 0 if pending else timeout)
        woken = waker in readable
        if woken:
            waker.drain()
        if sock in readable or pending:
            client.loop_read()  # a bounded batch of packets (GuardedClient)
            _ack_promptly(sock)
        if client.socket() is not None and writable:
            client.loop_write()
        if client.socket() is not None:
            client.loop_misc()
        return woken

    def connack_overdue(self, now: float) -> bool:
        return self.phase is Phase.HANDSHAKE and now > self.connack_deadline

    def connected(self, now: float) -> None:
        self.phase = Phase.UP
        self.connack_deadline = None
        self.connected_since = now
        self.round_trip = now - self._handshake_started
        self.timeout.learn(self.round_trip)

    def puback_timeout(self) -> float:
        return max(self.config.uplink.puback_timeout_s, 2 * (self.round_trip or 0.0))

    def stalled(self, now: float, urgent_since: float | None, last_puback: float) -> bool:
        """An alarm or test has waited too long for its PUBACK, and nothing else was
        acknowledged meanwhile: the link is dead, whatever TCP says."""
        if self.phase is not Phase.UP or urgent_since is None:
            return False
        return now - max(urgent_since, last_puback) > self.puback_timeout()

    def lost(self, now: float, *, timed_out: bool = False) -> bool:
        """The link ended (or an attempt failed at its handshake; ``timed_out``: waiting
        for the broker); returns whether it had been up. The next attempt follows the
        backoff."""
        was_up = self.phase is Phase.UP
        if self.phase is Phase.DOWN:
            return False
        if timed_out:
            self.timeout.expired()
        if was_up and now - self.connected_since >= STABLE_CONNECTION_S:
            # Only a connection that lasted resets the backoff: a broker that accepts and
            # then drops us at once (another client with our id) is not hammered.
            self.backoff.reset()
        self._down(now)
        return was_up

    def _down(self, now: float) -> None:
        if self.phase is not Phase.DOWN and len(self.endpoints) > 1:
            self.endpoint_index = (self.endpoint_index + 1) % len(self.endpoints)
            log.info("the next attempt goes to %s", self.describe_endpoint())
        self.phase = Phase.DOWN
        self.connack_deadline = None
        self._last_attempt = now
        self._urgent_gap = self._jittered_urgent_gap()
        self.next_attempt = now + self.backoff.next_delay()


def _ack_promptly(sock) -> None:
    """Acknowledge the broker's TCP segments at once (Linux TCP_QUICKACK, which the kernel
    clears again after a while, hence after every read).

    A broker that leaves Nagle's algorithm on (Mosquitto's default) holds back its next
    small packet - our next PUBACK - until our kernel acknowledges the last one, and the
    kernel delays that acknowledgement by up to 40 ms while we wait with a full window:
    measured in bench/alarm_path.py, a backlog drain then fell from 17,000 to under 1,000
    messages a second whenever alarms were being delivered.
    """
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
