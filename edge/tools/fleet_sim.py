"""``guardpost fleet-sim``: N simulated devices in one process, against any MQTT broker.

Why one paho client per device, driven by one loop: paho is what the uplink itself uses
(the same wire behaviour, the same MQTT 5 properties), and its external-loop interface
(``loop_read``/``loop_write``/``loop_misc`` with the socket callbacks) lets one thread
serve thousands of sockets through a selector, where ``loop_start`` would cost a thread
per device. No asyncio MQTT client is installed in the project; aiomqtt wraps paho
anyway, so it would add a dependency without removing paho's cost per message.

Each device (:mod:`edge.tools.fleet_device`) publishes a retained birth and registers a
will, a retained heartbeat every ``--heartbeat`` seconds (the contract's default 30 s),
and, across the fleet, an alarm about every ``--alarm-every`` seconds and a test about
every ``--test-every`` seconds, each signed with the device's own Ed25519 key and followed
by ``--snapshots`` JPEG-sized snapshots of ``--snapshot-kb``. The platform side
(:mod:`edge.tools.fleet_platform`) acknowledges them with a platform key; each device
checks the acknowledgement's signature and times publish -> ack (the round trip).

The simulator prints ``READY <n>`` once every device is connected and subscribed, and a
report when it ends (after ``--duration`` seconds, or at SIGTERM/SIGINT, when every
device publishes its clean ``offline``). Killed with SIGKILL, the broker publishes each
device's will.

``--broker`` takes one broker or several (the nodes of a cluster, comma-separated): the
devices are spread over them (device n starts on broker n mod N) and a device whose link
is lost moves to the next one, as a device with alternates does. The report says how many
devices each broker holds, and, when links were lost after READY, the time from the first
loss to every device reconnected and to every event of that span acknowledged (monotonic
clock, system-wide on Linux: a bench can compare it with the moment it killed a node).
``--protocol 3.1.1`` speaks MQTT 3.1.1 as the uplink does there (NATS speaks nothing else).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import os
import random
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge.contract.events import EventKind, Identity
from edge.contract.signing import Keyring
from edge.platform import DeviceKeys, PlatformSigner
from edge.tools.fleet_device import RESEND_S, SimDevice, fake_jpeg
from edge.tools.fleet_platform import FleetPlatform

log = logging.getLogger(__name__)

CONNECTS_PER_ROUND = 50  # new connections between two rounds of the loop: CONNACKs flow
MISC_INTERVAL_S = 1.0    # paho's keepalive bookkeeping, for every client
RECONNECT_MIN_S = 0.5     # the uplink's defaults (edge/config/link.py)
RECONNECT_MAX_S = 30.0
DISTURBED_S = 1.0         # a round trip longer than this was delayed by the loss
DRAIN_S = 10.0           # how long the end waits for outstanding acknowledgements (default)


@dataclass(frozen=True)
class FleetOptions:
    devices: int
    brokers: tuple[tuple[str, int], ...]
    protocol: str = "5"
    duration: float | None = None
    alarm_every: float = 5.0
    test_every: float = 15.0
    heartbeat: float = 30.0
    keepalive: int = 15
    snapshots: int = 2
    snapshot_kb: int = 60
    root: str = "guardpost/v1"
    site_prefix: str = "fleet-school"
    tls: dict | None = None
    broker_pid: int | None = None
    seed: int | None = None
    device_keys_out: str | None = None
    drain: float = DRAIN_S


class _Timers:
    """A heap of callbacks due at monotonic times."""

    def __init__(self):
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def at(self, due: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (due, next(self._order), action))

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def run_due(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            heapq.heappop(self._heap)[2]()


class Fleet:
    """The devices, their loop, the platform, and the figures of the run."""

    def __init__(self, options: FleetOptions, out=sys.stdout):
        self.options, self.out = options, out
        self.random = random.Random(options.seed)
        self.selector = selectors.DefaultSelector()
        self.timers = _Timers()
        self.signer = PlatformSigner.generate("fleet-sim")
        keyring = Keyring()
        keyring.add(self.signer.key_id, _raw_public_key(self.signer), ["ack"])
        self.device_keys = DeviceKeys()
        # Above every session a previous run may have left in a retained will.
        session_base = int(time.time())
        self.devices: list[SimDevice] = []
        for n in range(options.devices):
            identity = Identity(f"{options.site_prefix}-{n:05d}", "gate-1", f"Gate {n}")
            device = SimDevice(identity, options.root, session_base, keyring,
                               heartbeat_s=options.heartbeat, protocol=options.protocol)
            device.broker_index = n % len(options.brokers)
            self.device_keys.add(identity.site_id, identity.device_id, device.signer.public_key)
            self._attach(device)
            self.devices.append(device)
        if options.device_keys_out:
            _write_device_keys(options.device_keys_out, self.devices)
        self.platform = FleetPlatform(list(options.brokers), options.root, self.signer,
                                      self.device_keys, tls=options.tls,
                                      protocol=options.protocol)
        self.jpeg = fake_jpeg(options.snapshot_kb * 1024)
        self.stopping = self.draining = False
        self.ready_at: float | None = None
        self.at_ready: dict[str, int] = {}
        self.at_end: dict[str, int] = {}

    # -- the loop --------------------------------------------------------------------

    def _attach(self, device: SimDevice) -> None:
        client = device.build_client(keepalive=self.options.keepalive, tls=self.options.tls)
        selector = self.selector

        def opened(client_, userdata, sock):
            # As the uplink does (edge/daemons/uplink/connection.py): small packets at once.
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            selector.register(sock, selectors.EVENT_READ, client_)

        def closed(client_, userdata, sock):
            # Not registered when the connection failed before paho handed it over.
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(sock)

        # paho also calls these for a socket it already closed (after on_socket_close, and
        # from its __del__ at exit): nothing to change then.
        def want_write(client_, userdata, sock):
            with contextlib.suppress(KeyError, ValueError, OSError):
                selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client_)

        def written(client_, userdata, sock):
            with contextlib.suppress(KeyError, ValueError, OSError):
                selector.modify(sock, selectors.EVENT_READ, client_)

        client.on_socket_open, client.on_socket_close = opened, closed
        client.on_socket_register_write = want_write
        client.on_socket_unregister_write = written
        lost = client.on_disconnect

        def on_disconnect(client_, userdata, flags, reason_code, properties):
            was_connected = device.connected
            lost(client_, userdata, flags, reason_code, properties)
            if not self.stopping:
                if was_connected and self.ready_at is not None:
                    device.losses.append(time.monotonic())
                    device.reconnected_at = None
                    device.failed_attempts = 0
                else:
                    device.failed_attempts += 1
                self._move_on(device)
                self.timers.at(time.monotonic() + self._retry_delay(device),
                               lambda: self._connect(device))

        client.on_disconnect = on_disconnect

    def _connect(self, device: SimDevice) -> None:
        if self.stopping:
            return
        device.prepare_connect()
        host, port = self.options.brokers[device.broker_index]
        device.address = f"{host}:{port}"
        try:
            device.client.connect(host, port, keepalive=self.options.keepalive)
        except OSError as err:
            log.warning("%s: cannot connect to %s: %s", device.client_id, device.address, err)
            device.failed_attempts += 1
            self._move_on(device)
            self.timers.at(time.monotonic() + self._retry_delay(device),
                           lambda: self._connect(device))

    def _retry_delay(self, device: SimDevice) -> float:
        """As the uplink's ``reconnect_min``/``reconnect_max`` (0.5 s doubling up to 30 s
        per failed attempt), with jitter: a fleet that lost a node does not come back all
        in the same second, nor hammer a broker that refuses it."""
        base = min(RECONNECT_MAX_S, RECONNECT_MIN_S * 2 ** device.failed_attempts)
        return base * self.random.uniform(0.5, 1.5)

    def _move_on(self, device: SimDevice) -> None:
        """The next broker of the list, for the next attempt (a single broker stays)."""
        device.broker_index = (device.broker_index + 1) % len(self.options.brokers)

    def _round(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            client = key.data
            if mask & selectors.EVENT_READ:
                client.loop_read()
                _ack_promptly(client.socket())
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()

    def run(self) -> dict:
        """Run until ``duration`` after READY, or until :meth:`stop`; the report."""
        started, cpu_started = time.monotonic(), _cpu_seconds()
        broker_started = _process_cpu_seconds(self.options.broker_pid)
        self.platform.start()
        waiting = list(self.devices)
        next_misc = time.monotonic() + MISC_INTERVAL_S
        end = None
        while not self.stopping:
            now = time.monotonic()
            for device in waiting[:CONNECTS_PER_ROUND]:
                self._connect(device)
            del waiting[:CONNECTS_PER_ROUND]
            due = self.timers.next_due()
            self._round(0 if waiting else max(0.0, min(0.2, (due or now + 0.2) - now)))
            now = time.monotonic()
            self.timers.run_due(now)
            if now >= next_misc:
                for device in self.devices:
                    device.client.loop_misc()
                next_misc = now + MISC_INTERVAL_S
            if self.ready_at is None and self._all_ready():
                self._on_ready(now)
                end = None if self.options.duration is None else now + self.options.duration
            if end is not None and now >= end:
                self._drain()
                break
        figures_end = time.monotonic()
        self.at_end = self._per_broker()
        cpu = _cpu_seconds() - cpu_started
        broker_cpu = _process_cpu_seconds(self.options.broker_pid)
        self._stop_devices()
        self.platform.stop()
        wall = figures_end - started
        return self.report(wall, cpu, None if broker_started is None or broker_cpu is None
                           else broker_cpu - broker_started)

    def stop(self) -> None:
        """From a signal handler: the loop ends and every device says ``offline``."""
        self.stopping = True

    def _all_ready(self) -> bool:
        return (self.platform.subscribed.is_set()
                and all(device.subscribed for device in self.devices))

    def _on_ready(self, now: float) -> None:
        self.ready_at = now
        print(f"READY {len(self.devices)}", file=self.out, flush=True)
        for device in self.devices:
            self._heartbeat(device, now + self.random.uniform(0, self.options.heartbeat))
        if self.options.alarm_every > 0:
            self._next_event(EventKind.ALARM, self.options.alarm_every)
        if self.options.test_every > 0:
            self._next_event(EventKind.TEST, self.options.test_every)
        self.timers.at(now + RESEND_S, self._resend_round)
        self.at_ready = self._per_broker()

    def _resend_round(self) -> None:
        for device in self.devices:
            if device.unacknowledged:
                device.resend()
        self.timers.at(time.monotonic() + RESEND_S, self._resend_round)

    def _per_broker(self) -> dict[str, int]:
        """How many devices each broker holds now (those connected)."""
        counts = {f"{host}:{port}": 0 for host, port in self.options.brokers}
        for device in self.devices:
            if device.connected:
                counts[device.address] = counts.get(device.address, 0) + 1
        return counts

    def _heartbeat(self, device: SimDevice, due: float) -> None:
        def beat():
            device.publish_health()
            self._heartbeat(device, due + self.options.heartbeat)
        self.timers.at(due, beat)

    def _next_event(self, kind: EventKind, mean_interval: float) -> None:
        def happen():
            if self.stopping or self.draining:
                return
            device = self.random.choice(self.devices)
            event_id = device.publish_event(kind)
            if event_id is not None and self.options.snapshots:
                device.publish_snapshots(event_id, self.jpeg, self.options.snapshots)
            self._next_event(kind, mean_interval)
        self.timers.at(time.monotonic() + self.random.expovariate(1 / mean_interval), happen)

    def _drain(self) -> None:
        """The acknowledgements still on their way, for at most ``options.drain``
        seconds (resends go on meanwhile; no new event is made)."""
        self.draining = True
        deadline = time.monotonic() + self.options.drain
        while (any(device.awaiting_ack for device in self.devices)
               and time.monotonic() < deadline and not self.stopping):
            self._round(0.05)
            self.timers.run_due(time.monotonic())  # resends go on

    def _stop_devices(self) -> None:
        """Every connected device publishes its ``offline`` and disconnects."""
        self.stopping = True
        infos = [info for info in (device.publish_offline() for device in self.devices)
                 if info is not None]
        deadline = time.monotonic() + DRAIN_S
        while not all(info.is_published() for info in infos) and time.monotonic() < deadline:
            self._round(0.05)
        for device in self.devices:
            if device.client.socket() is not None:
                device.client.disconnect()
        while self.selector.get_map() and time.monotonic() < deadline:
            self._round(0.05)
        for device in self.devices:
            if device.client.socket() is not None:
                device.client.socket().close()

    # -- the report ------------------------------------------------------------------

    def report(self, wall_s: float, cpu_s: float, broker_cpu_s: float | None) -> dict:
        published = {}
        round_trips = []
        totals: dict[str, int] = {}
        for device in self.devices:
            round_trips += device.round_trips
            published.update(device.published)
            for name, value in vars(device.counts).items():
                totals[name] = totals.get(name, 0) + value
        to_platform = [self.platform.received[event_id] - at
                       for event_id, at in published.items()
                       if event_id in self.platform.received]
        cores = cpu_s / wall_s if wall_s > 0 else 0.0
        return {
            "devices": len(self.devices), "wall_s": round(wall_s, 3), **totals,
            "awaiting_ack": sum(len(device.awaiting_ack) for device in self.devices),
            "platform_received": len(self.platform.received),
            "platform_acked": self.platform.acked,
            "platform_snapshots": self.platform.snapshots,
            "not_verified": len(self.platform.not_verified),
            "round_trip_ms": _percentiles(round_trips),
            "to_platform_ms": _percentiles(to_platform),
            "sim_cpu_cores": round(cores, 3),
            "devices_per_core": round(len(self.devices) / cores) if cores else None,
            "broker_cpu_cores": None if broker_cpu_s is None else round(broker_cpu_s / wall_s, 3),
            "broker": dict(sorted(self.platform.broker_figures.items())),
            # event id -> CLOCK_MONOTONIC at its publication (machine-wide: another
            # process, a console, can time its own receipt against it)
            "published": {event_id: round(at, 6) for event_id, at in published.items()},
            "protocol": self.options.protocol,
            "devices_per_broker_at_ready": self.at_ready,
            "devices_per_broker_at_end": self.at_end,
            "failover": self._failover(),
        }

    def _failover(self) -> dict | None:
        """The links lost after READY: from the first loss to every device back, and to
        the last acknowledgement the loss delayed.

        "Since the loss" counts the events published from :data:`RESEND_S` before the
        first loss on (those possibly in flight then, and every later one); a delayed
        acknowledgement is one whose round trip took over :data:`DISTURBED_S`. Times are
        ``time.monotonic()`` values (CLOCK_MONOTONIC, the same in every process of the
        machine) and seconds from the first loss."""
        if self.ready_at is None:
            return None
        lost = [d for d in self.devices if d.losses]
        if not lost:
            return None
        first = min(d.losses[0] for d in lost)
        back = [d.reconnected_at for d in lost if d.reconnected_at is not None]
        # the moment the fleet was last whole again (a device may have lost its link twice)
        everyone_back = max(back) if len(back) == len(lost) else None
        before, after, delayed_acks = [], [], []
        published_since = 0
        for device in self.devices:
            for event_id, published in device.published.items():
                acked = device.acked_at.get(event_id)
                if published >= first - RESEND_S:
                    published_since += 1
                    if acked is not None:
                        after.append(acked - published)
                        if acked - published > DISTURBED_S:
                            delayed_acks.append(acked)
                elif acked is not None and acked < first:
                    before.append(acked - published)
        all_acked = len(after) == published_since
        return {
            "devices_lost": len(lost), "not_reconnected": len(lost) - len(back),
            "losses": sum(len(d.losses) for d in lost),
            "round_trip_before_loss_ms": _percentiles(before),
            "round_trip_since_loss_ms": _percentiles(after),
            "first_lost_at": first, "all_reconnected_at": everyone_back,
            "all_reconnected_s": None if everyone_back is None else round(
                everyone_back - first, 3),
            "gap_ms": _percentiles([gap for d in lost for gap in d.gaps]),
            "events_since_loss": published_since, "events_since_loss_acked": len(after),
            "events_delayed": len(delayed_acks),
            "last_delayed_ack_at": max(delayed_acks) if delayed_acks else None,
            "all_acked_s": None if not all_acked else round(
                max(delayed_acks) - first, 3) if delayed_acks else 0.0,
        }


def _write_device_keys(path: str, devices: list[SimDevice]) -> None:
    """The devices' event-signing public keys, as ``DeviceKeys.load`` reads them (JSON),
    for another platform (a console) to verify this fleet's events."""
    document = {"devices": {f"{d.identity.site_id}/{d.identity.device_id}":
                            d.signer.public_key for d in devices}}
    temporary = f"{path}.tmp"
    with open(temporary, "w") as out:
        json.dump(document, out)
    os.replace(temporary, path)


def _ack_promptly(sock) -> None:
    """TCP_QUICKACK after every read, as the uplink does: Mosquitto leaves Nagle's
    algorithm on, so the broker holds its next small packet (an acknowledgement for this
    device) until our kernel acknowledges the last one, which it may delay by 40 ms."""
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"count": len(ordered), "p50": at(0.50), "p99": at(0.99),
            "max": round(ordered[-1] * 1000, 3)}


def _raw_public_key(signer: PlatformSigner) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return signer.private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw)


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _process_cpu_seconds(pid: int | None) -> float | None:
    """User and system CPU seconds of another process (Linux /proc), None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def print_report(report: dict, out=sys.stdout) -> None:
    rt, tp = report["round_trip_ms"], report["to_platform_ms"]
    lines = [
        f"devices {report['devices']}  births {report['births']}  heartbeats "
        f"{report['heartbeats']}  events {report['events']}  snapshots {report['snapshots']}",
        f"platform: received {report['platform_received']} events, acknowledged "
        f"{report['platform_acked']}, snapshots {report['platform_snapshots']}, "
        f"not verified {report['not_verified']}",
        f"acknowledged at the devices {report['acks']}, still waiting {report['awaiting_ack']}",
        f"alarm/test round trip (publish -> ack at the device): n={rt['count']} "
        f"p50 {rt['p50']} ms  p99 {rt['p99']} ms  max {rt['max']} ms",
        f"publish -> platform receipt: n={tp['count']} p50 {tp['p50']} ms  p99 {tp['p99']} ms",
        f"simulator CPU {report['sim_cpu_cores']} cores -> {report['devices_per_core']} "
        f"devices per core; broker CPU {report['broker_cpu_cores']} cores",
        f"resent {report['resent']}, disconnections {report['disconnects']} (the stop's "
        f"included); devices per broker "
        f"at READY {_by_broker(report['devices_per_broker_at_ready'])}, at the end "
        f"{_by_broker(report['devices_per_broker_at_end'])}",
    ]
    failover = report["failover"]
    if failover:
        lines.append(
            f"failover: {failover['devices_lost']} devices lost their link ({failover['losses']} "
            f"times); every one back "
            f"{failover['all_reconnected_s']} s after the first loss (gap per device p50 "
            f"{failover['gap_ms']['p50']} ms, max {failover['gap_ms']['max']} ms; "
            f"{failover['not_reconnected']} not back); events since the loss "
            f"{failover['events_since_loss_acked']}/{failover['events_since_loss']} "
            f"acknowledged ({failover['events_delayed']} over {DISTURBED_S} s), the last "
            f"delayed one {failover['all_acked_s']} s after the loss")
    # The one-minute averages and the gauges; the 5 and 15 min ones are in --json.
    lines += [f"broker {name}: {value}" for name, value in report["broker"].items()
              if not name.endswith(("/5min", "/15min"))]
    print("\n".join(lines), file=out, flush=True)


def _by_broker(counts: dict[str, int]) -> str:
    return ", ".join(f"{address}: {n}" for address, n in counts.items()) or "-"


def parse_broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "1883")
    return host, int(port)


def parse_brokers(text: str) -> tuple[tuple[str, int], ...]:
    """``host[:port],host[:port],...``: one broker or the nodes of a cluster."""
    brokers = tuple(parse_broker(part.strip()) for part in text.split(",") if part.strip())
    if not brokers:
        raise ValueError(f"no broker in {text!r}")
    return brokers


def main(args) -> int:
    """The ``fleet-sim`` command (edge/tools/cli.py)."""
    brokers = parse_brokers(args.broker)
    tls = None
    if args.cafile:
        tls = {"ca_certs": args.cafile, "certfile": args.certfile, "keyfile": args.keyfile}
    options = FleetOptions(
        devices=args.devices, brokers=brokers, protocol=args.protocol, duration=args.duration,
        alarm_every=args.alarm_every, test_every=args.test_every, heartbeat=args.heartbeat,
        snapshots=args.snapshots, snapshot_kb=args.snapshot_kb, root=args.root,
        site_prefix=args.site_prefix, tls=tls, broker_pid=args.broker_pid, seed=args.seed,
        device_keys_out=args.device_keys_out, drain=args.drain)
    fleet = Fleet(options)
    signal.signal(signal.SIGTERM, lambda signum, frame: fleet.stop())
    signal.signal(signal.SIGINT, lambda signum, frame: fleet.stop())
    report = fleet.run()
    print_report(report)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    return 0
