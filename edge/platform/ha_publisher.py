"""``guardpost ha-discovery``: publish Home Assistant discovery configs for every Guardpost
device a broker carries (the configs themselves: :mod:`edge.platform.ha_discovery`).

It subscribes to the devices' retained ``status`` (``{root}/+/+/status``, or one site's
with ``--site``), and publishes, retained, each device's configs; a birth with another
``version`` (or, while it runs, an alarm or reset naming a new ``location``) publishes them
again. ``--remove`` publishes empty retained configs instead: Home Assistant removes the
entities. ``--once`` stops when the broker has sent every retained status: after
subscribing, the tool sends itself a probe on the same connection, and the broker delivers
the retained messages of a subscription before anything published after it.

A status that is not a Guardpost status of the device its topic names is ignored and
logged, never a crash: the broker may carry anything.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge.platform.ha_discovery import config_topics, configs

log = logging.getLogger(__name__)

EX_USAGE, EX_UNAVAILABLE, EX_CONFIG = 64, 69, 78
STATUS_SCHEMA = "guardpost/status@1"
NAMING_EVENTS = ("alarm", "reset")  # the topics Home Assistant reads anyway (event entities)
PUBLISH_TIMEOUT_S = 10.0


class BrokerValueError(ValueError):
    """``--broker`` is not HOST[:PORT]."""


def parse_broker(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = text, "1883"
    if not host or any(c.isspace() or c in "/#+" for c in host):
        raise BrokerValueError(f"--broker {text!r}: expected HOST[:PORT]")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BrokerValueError(f"--broker {text!r}: the port must be 1-65535")
    return host, int(port)


@dataclass
class DeviceSeen:
    birth: dict
    location: str | None = None
    published: tuple | None = None   # what its configs were last published from


@dataclass(frozen=True)
class DiscoveryOptions:
    host: str
    port: int = 1883
    root: str = "guardpost/v1"
    discovery_prefix: str = "homeassistant"
    sites: tuple[str, ...] = ()
    remove: bool = False
    watch_events: bool = False       # names from alarms and resets (only while running)
    tls: dict | None = None
    client_id: str = field(default_factory=lambda: f"guardpost-ha-{os.getpid()}")


class DiscoveryPublisher:
    def __init__(self, options: DiscoveryOptions):
        self.options = options
        self.devices: dict[tuple[str, str], DeviceSeen] = {}
        self.ignored = 0
        self.refused: str | None = None      # the broker's CONNACK reason, if it refused
        self.caught_up = threading.Event()   # every retained status has arrived
        self._lock = threading.Lock()
        self._in_flight: list[paho.MQTTMessageInfo] = []
        self._probe = f"{options.discovery_prefix}/guardpost_probe/{options.client_id}"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=options.client_id,
                                  protocol=paho.MQTTv5)
        if options.tls:
            self.client.tls_set(**options.tls)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 5.0)

    def start(self) -> DiscoveryPublisher:
        self.client.connect(self.options.host, self.options.port, keepalive=30)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.flush()
        self.client.disconnect()
        self.client.loop_stop()

    def flush(self, timeout: float = PUBLISH_TIMEOUT_S) -> bool:
        """Wait until the broker has taken every config published so far."""
        with self._lock:
            pending, self._in_flight = self._in_flight, []
        ok = True
        for info in pending:
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                ok = False
            ok = ok and info.is_published()
        return ok

    # -- MQTT ------------------------------------------------------------------------

    def _filters(self, leaf: str) -> list[str]:
        sites = self.options.sites or ("+",)
        return [f"{self.options.root}/{site}/+/{leaf}" for site in sites]

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.refused = str(reason_code)
            log.error("broker refused the connection: %s", reason_code)
            return
        topics = self._filters("status")
        if self.options.watch_events:
            topics += [t for kind in NAMING_EVENTS for t in self._filters(f"event/{kind}")]
        client.subscribe([(t, 1) for t in topics] + [(self._probe, 1)])
        client.publish(self._probe, b"", qos=1)

    def _on_message(self, client, userdata, message) -> None:
        try:
            if message.topic == self._probe:
                self._publish_changed()
                self.caught_up.set()
                return
            site_id, device_id, leaf = self._split(message.topic)
            if leaf == "status":
                self._on_status(site_id, device_id, message.payload)
            else:
                self._on_event(site_id, device_id, message.payload)
            if self.caught_up.is_set():
                self._publish_changed()
        except Exception:  # the broker may carry anything: never out of paho's callback
            self.ignored += 1
            log.exception("ignored a message on %s", message.topic)

    def _split(self, topic: str) -> tuple[str, str, str]:
        rest = topic[len(self.options.root) + 1:]
        site_id, device_id, leaf = rest.split("/", 2)
        return site_id, device_id, leaf

    def _on_status(self, site_id: str, device_id: str, payload: bytes) -> None:
        body = _json(payload)
        if (not isinstance(body, dict) or body.get("schema") != STATUS_SCHEMA
                or body.get("site_id") != site_id or body.get("device_id") != device_id
                or body.get("state") not in ("online", "offline")):
            self.ignored += 1
            log.warning("ignored %s/%s/status: not a Guardpost status of that device",
                        site_id, device_id)
            return
        seen = self.devices.get((site_id, device_id))
        if seen is None:
            self.devices[(site_id, device_id)] = DeviceSeen(body)
        elif body.get("state") == "online" or "version" not in seen.birth:
            seen.birth = body    # a will carries no version: keep the birth's

    def _on_event(self, site_id: str, device_id: str, payload: bytes) -> None:
        body = _json(payload)
        seen = self.devices.get((site_id, device_id))
        location = body.get("location") if isinstance(body, dict) else None
        if seen is not None and isinstance(location, str) and 0 < len(location) <= 200:
            seen.location = location

    def _publish_changed(self) -> None:
        for (site_id, device_id), seen in list(self.devices.items()):
            basis = ("remove",) if self.options.remove else (
                seen.birth.get("version"), seen.location)
            if seen.published == basis:
                continue
            seen.published = basis
            if self.options.remove:
                messages = {t: b"" for t in config_topics(
                    self.options.discovery_prefix, site_id, device_id)}
            else:
                messages = {t: json.dumps(c, ensure_ascii=False).encode() for t, c in configs(
                    self.options.discovery_prefix, self.options.root, site_id, device_id,
                    seen.birth, seen.location).items()}
            for topic, payload in messages.items():
                info = self.client.publish(topic, payload, qos=1, retain=True)
                with self._lock:   # (a long run keeps only those not yet taken)
                    self._in_flight = [i for i in self._in_flight if not i.is_published()]
                    self._in_flight.append(info)
            log.info("%s %s/%s (%d configs)", "removed" if self.options.remove
                     else "published", site_id, device_id, len(messages))


def _json(payload: bytes):
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return None


def main(args) -> int:
    """The ``ha-discovery`` command (edge/tools/cli.py)."""
    try:
        host, port = parse_broker(args.broker)
    except BrokerValueError as err:
        print(f"ha-discovery: {err}", file=sys.stderr)
        return EX_USAGE
    if (args.certfile or args.keyfile) and not args.cafile:
        print("ha-discovery: --certfile and --keyfile need --cafile (TLS)", file=sys.stderr)
        return EX_USAGE
    tls = ({"ca_certs": args.cafile, "certfile": args.certfile, "keyfile": args.keyfile}
           if args.cafile else None)
    options = DiscoveryOptions(host, port, args.root, args.prefix, tuple(args.site),
                               args.remove, watch_events=not args.once, tls=tls)
    publisher = DiscoveryPublisher(options)
    try:
        publisher.start()
    except socket.gaierror as err:
        print(f"ha-discovery: --broker {host}: no such host ({err.strerror})", file=sys.stderr)
        return EX_CONFIG
    except OSError as err:
        print(f"ha-discovery: cannot connect to {host}:{port}: {err}", file=sys.stderr)
        return EX_UNAVAILABLE
    stop = threading.Event()
    if args.once:
        if not publisher.caught_up.wait(args.timeout):
            publisher.stop()
            why = (f"the broker refused the connection ({publisher.refused})"
                   if publisher.refused else f"no answer within {args.timeout:g} s")
            print(f"ha-discovery: {host}:{port}: {why}", file=sys.stderr)
            return EX_UNAVAILABLE
    else:
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
        signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
        while not stop.wait(1.0):
            pass
    flushed = publisher.flush()
    publisher.stop()
    verb = "removed" if args.remove else "published"
    print(f"ha-discovery: {verb} the configs of {len(publisher.devices)} device(s)"
          + (f", ignored {publisher.ignored} malformed message(s)" if publisher.ignored else ""))
    return 0 if flushed else 1
