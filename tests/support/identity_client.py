"""Clients that connect to a broker with one certificate each, for the broker tests.

:class:`IdentityClient` speaks MQTT 5 and records what the broker answers: the CONNACK,
each PUBACK's reason code (0x87 Not authorized is how MQTT 5 says the ACL refused a
publish), the messages delivered, a disconnection. It never reconnects on its own: a
connection the broker closed stays closed, so a test sees it. :func:`broker_answer`
goes below paho: a TLS handshake and a CONNECT, and whether a CONNACK came back.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from tests.support.pki import Credential

ALLOWED = (0x00, 0x10)  # Success, No matching subscribers
NOT_AUTHORIZED = 0x87


@dataclass(frozen=True)
class Delivered:
    topic: str
    payload: bytes
    retained: bool


class IdentityClient:
    def __init__(self, host: str, port: int, ca: Path, credential: Credential, *,
                 client_id: str = "any-client-id"):
        self._host, self._port = host, port
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=paho.MQTTv5)
        self.client.tls_set(ca_certs=str(ca), certfile=str(credential.cert),
                            keyfile=str(credential.key), cert_reqs=ssl.CERT_REQUIRED)
        self._cond = threading.Condition()
        self.connack: tuple[int, object] | None = None  # reason code, properties
        self.connections = 0
        self.disconnected: str | None = None
        self.pubacks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self.messages: list[Delivered] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # -- what the broker says (paho's network thread) --------------------------------------

    def _note(self, change) -> None:
        with self._cond:
            change()
            self._cond.notify_all()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        def change():
            self.connack = (reason_code.value, properties)
            self.connections += 1
        self._note(change)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._note(lambda: setattr(self, "disconnected", str(reason_code)))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._note(lambda: self.pubacks.__setitem__(mid, reason_code.value))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._note(lambda: self.subacks.__setitem__(mid, [r.value for r in reason_codes]))

    def _on_message(self, client, userdata, message) -> None:
        delivered = Delivered(message.topic, message.payload, bool(message.retain))
        self._note(lambda: self.messages.append(delivered))

    def _loop(self) -> None:
        # paho's own loop thread reconnects after a disconnection: this one does not.
        while not self._stop.is_set():
            if self.client.loop(0.05) != paho.MQTT_ERR_SUCCESS:
                break

    # -- what a test does --------------------------------------------------------------------

    def wait_for(self, predicate, what: str, timeout: float = 30.0):
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out waiting for {what}")
            return predicate()

    def connect(self) -> IdentityClient:
        self.client.connect(self._host, self._port, keepalive=30, clean_start=True)
        self._thread = threading.Thread(target=self._loop, name="identity-client", daemon=True)
        self._thread.start()
        self.wait_for(lambda: self.connack is not None or self.disconnected is not None,
                      what="the CONNACK")
        if self.connack is None or self.connack[0] != 0:
            raise AssertionError(f"not connected: {self.connack or self.disconnected}")
        return self

    def publish(self, topic: str, payload: bytes = b"probe", *, retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self.wait_for(lambda: info.mid in self.pubacks or self.disconnected is not None,
                      what=f"the PUBACK of {topic} (paho: {info.rc})")
        if info.mid not in self.pubacks:
            raise AssertionError(f"disconnected before the PUBACK of {topic}: "
                                 f"{self.disconnected}")
        return self.pubacks[info.mid]

    def subscribe(self, topic_filter: str, *, retain_handling: int = 0) -> list[int]:
        options = SubscribeOptions(qos=1, retainHandling=retain_handling)
        _, mid = self.client.subscribe(topic_filter, options=options)
        self.wait_for(lambda: mid in self.subacks, what=f"the SUBACK of {topic_filter}")
        return self.subacks[mid]

    def received(self, topic: str) -> list[Delivered]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def wait_for_message(self, topic: str) -> Delivered:
        return self.wait_for(lambda: next((m for m in self.messages if m.topic == topic), None),
                             what=f"a message on {topic}")

    def close(self) -> None:
        if self._thread is None:
            return
        if self.disconnected is None:
            self.client.disconnect()  # the loop sends it, then ends with the connection
        self._thread.join(5)
        self._stop.set()
        self._thread.join(5)


def broker_answer(host: str, port: int, ca: Path, credential: Credential | None) -> str:
    """Shake hands over TLS 1.2 (with ``credential``'s certificate, or none) and send an
    MQTT 3.1.1 CONNECT: ``"CONNACK"`` if the broker answered with one, else what went
    wrong in OpenSSL's words (the TLS alert the broker sent).

    TLS 1.2 because there the broker judges the client's certificate inside the
    handshake, so its alert is read before the client has sent anything. (With TLS 1.3 it
    judges it after the client has finished, the client's CONNECT is already on its way,
    and the alert may be lost to the reset of a socket closed with unread data.)"""
    context = ssl.create_default_context(cafile=str(ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    if credential is not None:
        context.load_cert_chain(str(credential.cert), str(credential.key))
    connect = bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 1]) + b"x"
    with socket.create_connection((host, port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(connect)
                answer = tls.recv(4)
        except ssl.SSLError as err:
            return f"refused: {err.reason}"
    if answer[:1] == b"\x20":
        return "CONNACK"
    return f"closed without a CONNACK ({answer!r})"
