"""``guardpost watch``: a minimal stand-in for the police platform.

It subscribes to a site's subtree, prints every message as it arrives and, with
``--ack``, acknowledges each event that asks for it (alarms and tests) the way the
platform would: an acknowledgement signed with a platform key (``--key``, ``--key-id``:
one the device's ``[[trust.platform_keys]]`` lists with the role ``ack``) on the device's
``ack`` topic. It keeps a
persistent session so that nothing published while it was away is missed, notices
duplicates (delivery is at least once) and gaps in the sequence numbers.

Given the devices' event-signing keys (``--device-keys``, a registry as
:mod:`edge.platform.events` reads it), it verifies every event's signature and marks one
that does not verify loudly (it still acknowledges it: the message did arrive, and a
genuine alarm must not wait for the SMS path because of a registry's mistake).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TextIO

import paho.mqtt.client as paho

from edge.config import BrokerConfig
from edge.platform import DeviceKeys, EventNotVerified, PlatformSigner
from edge.runtime.mqtt import connect, make_client

log = logging.getLogger(__name__)


@dataclass
class _DeviceTrack:
    seen_ids: set[str] = field(default_factory=set)
    seen_seqs: set[int] = field(default_factory=set)
    highest: int = 0


class Watcher:
    """Subscribes to ``{root}/{site}/#`` and reports (and optionally acknowledges) events."""

    def __init__(self, broker: BrokerConfig, topic_root: str, site: str, *, ack: bool,
                 as_json: bool = False, count: int | None = None, client_id: str | None = None,
                 by: str = "guardpost watch", out: TextIO = sys.stdout, prefix: str = "",
                 signer: PlatformSigner | None = None, device_keys: DeviceKeys | None = None):
        self.broker = broker
        self.filter = f"{topic_root}/{site}/#"
        self.topic_root = topic_root
        if ack and signer is None:
            raise ValueError("acknowledging needs a platform key (a device believes only "
                             "signed acknowledgements)")
        self.ack = ack
        self.signer = signer
        self.as_json = as_json
        self.count = count
        self.by = by
        self.out = out
        self.prefix = prefix
        self.events: list[dict] = []  # every event payload received, in arrival order
        self.device_keys = device_keys
        self.verified = 0             # events whose device signature verified
        self.unverified: list[tuple[str, str]] = []  # (topic, why) of those that did not
        self.snapshots: list[dict] = []  # the description of every snapshot received
        self.arrived = threading.Condition()
        self.done = threading.Event()
        self.subscribed = threading.Event()
        self._tracks: dict[str, _DeviceTrack] = defaultdict(_DeviceTrack)
        self._lock = threading.Lock()
        self.client = make_client(broker, client_id or f"gp-watch-{site}", persistent=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.reconnect_delay_set(0.2, 5)

    def start(self) -> None:
        connect(self.client, self.broker, persistent=True)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for_events(self, count: int, timeout: float) -> bool:
        """Block until ``count`` events (copies included) have arrived."""
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.events) >= count, timeout)

    def _print(self, text: str) -> None:
        with self._lock:
            self.out.write(f"{self.prefix}{text}\n")
            self.out.flush()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._print(f"broker refused the connection: {reason_code}")
            return
        client.subscribe(self.filter, qos=1)
        if not self.as_json:
            self._print(f"watching {self.filter} on {self.broker.host}:{self.broker.port}"
                        f"{' (acknowledging alarms and tests)' if self.ack else ''}")

    def _on_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        # The watcher is the platform's side: its own clock, not the device's.
        received = datetime.now().astimezone()
        relative = message.topic[len(self.topic_root) + 1:]
        parts = relative.split("/")
        if len(parts) < 3:
            return
        site, device, leaf = parts[0], parts[1], "/".join(parts[2:])
        if leaf == "ack":
            return  # our own acknowledgements, echoed back by the subscription
        if leaf.startswith("snapshot/"):
            self._on_snapshot(message, received, site, device)
            return
        try:
            body = json.loads(message.payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        verdict = self._verify(message) if leaf.startswith("event/") else None
        if self.as_json:
            record = {"topic": message.topic, "received_at": received.isoformat(),
                      "retained": bool(message.retain), "payload": body}
            if verdict is not None:
                record["verified"] = verdict is True
                if verdict is not True:
                    record["not_verified"] = verdict
            self._print(json.dumps(record, ensure_ascii=False))
        else:
            line = self._describe(site, device, leaf, body)
            if verdict is True:
                line += "  [signature verified]"
            elif verdict is not None:
                line = f"!! NOT VERIFIED ({verdict}) !! {line}"
            self._print(f"{received:%H:%M:%S.%f}"[:-3] + f"  {site}/{device}  " + line)
        if leaf.startswith("event/") and isinstance(body, dict):
            if self.ack and body.get("ack_required"):
                client.publish(*self.signer.ack(f"{self.topic_root}/{site}/{device}",
                                                body["id"], by=self.by), qos=1)
                if not self.as_json:
                    self._print(f"{' ' * 12}  -> acknowledged {body['kind']} seq {body['seq']}")
            with self.arrived:
                self.events.append(body)
                self.arrived.notify_all()
            if self.count is not None and len(self.events) >= self.count:
                self.done.set()

    def _verify(self, message: paho.MQTTMessage) -> bool | str | None:
        """True if the event's device signature verifies, else why not; None unchecked."""
        if self.device_keys is None:
            return None
        try:
            self.device_keys.verify(message.payload, topic=message.topic)
        except EventNotVerified as err:
            with self.arrived:
                self.unverified.append((message.topic, str(err)))
            return str(err)
        with self.arrived:
            self.verified += 1
        return True

    def _on_snapshot(self, message: paho.MQTTMessage, received: datetime, site: str,
                     device: str) -> None:
        properties = getattr(message.properties, "UserProperty", None) if message.properties \
            else None
        if properties:
            about, jpeg = dict(properties), message.payload
        else:  # MQTT 3.1.1: a JSON line, then the JPEG
            header, _, jpeg = message.payload.partition(b"\n")
            try:
                about = json.loads(header)
            except (UnicodeDecodeError, json.JSONDecodeError):
                about = {}
            if not isinstance(about, dict):  # valid JSON, but not the description
                about = {}
        verdict = self._verify_snapshot(about, bytes(jpeg), message.topic)
        with self.arrived:
            self.snapshots.append(about)
            self.arrived.notify_all()
        if self.as_json:
            record = {"topic": message.topic, "received_at": received.isoformat(),
                      "snapshot": about, "jpeg_bytes": len(jpeg)}
            if verdict is not None:
                record["verified"] = verdict is True
                if verdict is not True:
                    record["not_verified"] = verdict
            self._print(json.dumps(record, ensure_ascii=False))
            return
        line = (f"SNAPSHOT {about.get('camera')} {about.get('phase')} #{about.get('index')} "
                f"({float(about.get('offset_s', 0)):+.1f} s) {about.get('width')}x"
                f"{about.get('height')} {len(jpeg) // 1024} kB for "
                f"{str(about.get('event_id'))[:13]}…")
        if verdict is True:
            line += "  [signature verified]"
        elif verdict is not None:
            line = f"!! NOT VERIFIED ({verdict}) !! {line}"
        self._print(f"{received:%H:%M:%S.%f}"[:-3] + f"  {site}/{device}  {line}")

    def _verify_snapshot(self, about: dict, jpeg: bytes, topic: str) -> bool | str | None:
        if self.device_keys is None:
            return None
        try:
            self.device_keys.verify_snapshot(about, jpeg, topic=topic)
        except EventNotVerified as err:
            with self.arrived:
                self.unverified.append((topic, str(err)))
            return str(err)
        return True

    def _describe(self, site: str, device: str, leaf: str, body) -> str:
        if not isinstance(body, dict):
            return f"{leaf}: (not JSON)"
        if leaf == "status":
            extra = f", v{body['version']}" if body.get("version") else ""
            reason = f", {body['reason']}" if body.get("reason") else ""
            return f"STATUS {body.get('state')} (session {body.get('session')}{extra}{reason})"
        if leaf == "health":
            o = body.get("outbox", {})
            latched = ",".join(body.get("latched") or []) or "none"
            return (f"HEALTH unsent {o.get('queued')}, awaiting ack {o.get('sent_unacknowledged')},"
                    f" latched {latched}")
        if leaf == "rejected":
            return f"REJECTED {body.get('topic')}: {body.get('reason')}"
        if leaf.startswith("event/"):
            return self._describe_event(f"{site}/{device}", body)
        return f"{leaf}: {json.dumps(body, ensure_ascii=False)[:200]}"

    def _describe_event(self, device_key: str, body: dict) -> str:
        track = self._tracks[device_key]
        seq, event_id = body.get("seq"), body.get("id")
        notes = []
        if event_id in track.seen_ids:
            notes.append("duplicate")
        else:
            track.seen_ids.add(event_id)
            if isinstance(seq, int):
                if seq > track.highest + 1 and track.highest:
                    missing = [s for s in range(track.highest + 1, seq) if s not in track.seen_seqs]
                    if missing:
                        notes.append(f"not yet seen: seq {missing[0]}..{missing[-1]}")
                track.seen_seqs.add(seq)
                track.highest = max(track.highest, seq)
        text = (f"{str(body.get('kind')).upper():7} #{seq} code {body.get('code')}"
                f" input={body.get('input', '-')} id={event_id}")
        if body.get("repeat_of"):
            text += f" (repeat {body.get('repeat')} of {body['repeat_of'][:13]}…)"
        if body.get("kind") == "reset":
            text += f" (cleared by {body.get('detail', {}).get('by')})"
        if not body.get("clock_synced", True):
            text += " [clock not synchronised]"
        if notes:
            text += "  [" + "; ".join(notes) + "]"
        return text
