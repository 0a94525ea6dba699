"""Building a paho-mqtt client from the configuration (TLS, credentials, protocol), and what
paho lacks for a device that anyone on the broker can send messages to.

- :class:`GuardedClient` never holds more than ``max_inbound`` bytes of one incoming
  packet: paho buffers a whole packet before anything sees it (a 100 MB message took the
  uplink to 487 MB). MQTT 5 also tells the broker the limit (CONNECT Maximum Packet Size,
  :func:`connect_properties`); MQTT 3.1.1 cannot, hence the guard. An oversized PUBLISH is
  read and thrown away as it arrives, and reported (topic, packet id, the head of its
  payload) so that it can be refused and acknowledged like any bad message.
- :class:`GuardedClient` also connects with :func:`staggered_connect`: while no answer
  comes, a fresh SYN every second, so a link that comes back is used within a second even
  when the connect timeout has grown long for a slow link (one connect() would wait for
  the kernel's next SYN retransmission: up to 16 s later after a 30 s outage).
- :class:`PackedProperties`: MQTT 5 publish properties encoded once, with an optional
  Correlation Data appended per message. paho encodes properties again for every
  message, which costs as much as the rest of a publish (bench/alarm_path.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from edge.config import BrokerConfig

log = logging.getLogger(__name__)

_PUBLISH = 0x30
_CORRELATION_DATA = 0x09  # MQTT 5 property identifiers
_USER_PROPERTY = 0x26
HEAD_BYTES = 4096         # what is kept of an oversized message: enough to say what it was
_DISCARD_CHUNK = 256 * 1024
_DISCARD_ROUND = 16       # chunks thrown away per read call, so other work is not starved
SYN_STAGGER_S = 1.0       # while no answer comes, a new connection attempt this often ...
MAX_PENDING_SYNS = 16     # ... with at most this many waiting at once


def is_v5(broker: BrokerConfig) -> bool:
    return broker.protocol == "5"


@dataclass(frozen=True)
class OversizedMessage:
    """A PUBLISH over the inbound limit, of which only the head was kept."""

    topic: str
    mid: int
    qos: int
    retain: bool
    size: int                       # its remaining length, as announced
    head: bytes                     # the first bytes of its payload
    properties: Properties | None   # None when they did not fit in the head


_paho_sock_recv = paho.Client._sock_recv


class GuardedClient(paho.Client):
    """A paho client that refuses to buffer an incoming packet over ``max_inbound`` bytes,
    and reads incoming packets in batches of a bounded size.

    It hooks ``_sock_recv``, paho's one read primitive, while paho's ``_packet_read``
    is in the payload of an oversized PUBLISH: the bytes are read and dropped (keeping
    the head), and paho is told "nothing yet" until the packet has gone by, when its
    reader is reset and :attr:`on_oversized` called. Other packets are paho's as ever.
    """

    def __init__(self, *args, max_inbound: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_inbound = max_inbound
        self._within = max_inbound - 5  # a remaining length this small is within the limit
        self.on_oversized: Callable[[OversizedMessage], None] | None = None
        self._discarding: dict | None = None  # {"left": bytes to drop, "head": bytearray}

    def loop_read(self, max_packets: int = 64) -> paho.MQTTErrorCode:
        """Read up to ``max_packets`` packets (paho would read only as many as it has
        messages in flight: one at a time while idle). A flood is taken in bounded
        batches, so the caller's other work runs between them."""
        for _ in range(max(max_packets, 1)):
            if self._sock is None:
                return paho.MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == paho.MQTTErrorCode.MQTT_ERR_AGAIN:
                break
        return paho.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _sock_recv(self, bufsize: int) -> bytes:
        if bufsize <= self._within and self._discarding is None:
            # The common case: paho asks for a header byte, or for the rest of a packet
            # that is within the limit (its first payload read asks for all of it).
            return _paho_sock_recv(self, bufsize)
        packet = self._in_packet
        if (self._discarding is None and packet["have_remaining"]
                and packet["command"] & 0xF0 == _PUBLISH
                and 1 + len(packet["remaining_count"]) + packet["remaining_length"]
                > self.max_inbound):
            self._discarding = {"left": packet["remaining_length"], "head": bytearray()}
        if self._discarding is None:
            return super()._sock_recv(bufsize)
        return self._discard()

    def _discard(self) -> bytes:
        state = self._discarding
        for _ in range(_DISCARD_ROUND):
            data = super()._sock_recv(min(state["left"], _DISCARD_CHUNK))  # may raise: as paho
            if not data:
                return data  # the connection closed: paho handles that
            if len(state["head"]) < HEAD_BYTES + 1024:
                state["head"] += data[:HEAD_BYTES + 1024 - len(state["head"])]
            state["left"] -= len(data)
            with self._msgtime_mutex:
                self._last_bytes_received = paho.time_func()
            if state["left"] == 0:
                self._finish_discard()
                break
        # "Nothing more now": paho's reader keeps its (empty) buffer and asks again later,
        # or starts on the next packet once ours was reset.
        raise BlockingIOError

    def _finish_discard(self) -> None:
        command, size = self._in_packet["command"], self._in_packet["remaining_length"]
        head = bytes(self._discarding["head"])
        self._discarding = None
        self._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [],
                           "remaining_mult": 1, "remaining_length": 0, "packet": bytearray(b""),
                           "to_process": 0, "pos": 0}
        message = _describe_head(command, size, head, self._protocol == paho.MQTTv5)
        log.warning("dropped an incoming message of %d bytes on %s (limit %d)", size,
                    message.topic, self.max_inbound)
        if self.on_oversized is not None:
            self.on_oversized(message)  # the callback handles its own errors

    def _reset_sockets(self, sockpair_only: bool = False) -> None:
        if not sockpair_only:
            self._discarding = None  # a packet cut by the connection's end is forgotten
        super()._reset_sockets(sockpair_only)

    def reconnect(self) -> paho.MQTTErrorCode:
        self._discarding = None
        return super().reconnect()

    def _create_socket_connection(self) -> socket.socket:
        if self._get_proxy():
            return super()._create_socket_connection()
        return staggered_connect((self._host, self._port), self._connect_timeout,
                                 source=(self._bind_address, self._bind_port))


def staggered_connect(address: tuple[str, int], timeout: float, *,
                      source: tuple[str, int] | None = None,
                      stagger: float = SYN_STAGGER_S) -> socket.socket:
    """A TCP connection to ``address`` within ``timeout``, like ``socket.create_connection``,
    but while no answer comes a new attempt starts every ``stagger`` seconds beside the
    earlier ones (their SYNs may yet be answered on a slow link; a new one goes out at
    once on a link that has just come back). The first to connect wins; a refusal ends
    it at once (the host answered). Returns a blocking socket with ``timeout``."""
    candidates = socket.getaddrinfo(address[0], address[1], 0, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    pending: list[socket.socket] = []
    next_start, started = time.monotonic(), 0
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"timed out after {timeout:g} s")
            if now >= next_start:
                family, kind, proto, _, target = candidates[started % len(candidates)]
                started += 1
                sock = socket.socket(family, kind, proto)
                pending.append(sock)
                if len(pending) > MAX_PENDING_SYNS:
                    pending.pop(0).close()
                sock.setblocking(False)
                if source and source != ("", 0):
                    sock.bind(source)
                code = sock.connect_ex(target)
                if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
                    raise OSError(code, os.strerror(code))
                next_start = now + stagger
            _, ready, _ = select.select([], pending, [], max(0.0, min(next_start, deadline)
                                                            - time.monotonic()))
            for sock in ready:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code))
                pending.remove(sock)
                sock.settimeout(timeout)
                return sock
    finally:
        for sock in pending:
            sock.close()


def _describe_head(command: int, size: int, head: bytes, v5: bool) -> OversizedMessage:
    """Topic, packet id, properties and payload head of a PUBLISH from its first bytes."""
    qos, retain = (command & 0x06) >> 1, bool(command & 0x01)
    topic, mid, properties, payload = "", 0, None, b""
    # The head is cut wherever the limit fell: what could not be read stays unknown.
    with contextlib.suppress(struct.error, ValueError, IndexError, MalformedPacket):
        (length,) = struct.unpack_from("!H", head)
        topic = head[2:2 + length].decode()
        position = 2 + length
        if qos:
            (mid,) = struct.unpack_from("!H", head, position)
            position += 2
        payload = head[position:]
        if v5:
            payload = b""  # until the properties are known, nothing is the payload
            props = Properties(PacketTypes.PUBLISH)
            _, used = props.unpack(head[position:])
            properties, payload = props, head[position + used:]
    return OversizedMessage(topic, mid, qos, retain, size, payload[:HEAD_BYTES], properties)


class PackedProperties:
    """MQTT 5 publish properties in their wire form, for paho's ``publish(properties=)``
    (paho only ever calls ``pack()`` on them).

    ``constant`` is encoded once (for every event: content type and response topic);
    :meth:`with_correlation` adds a Correlation Data property per message at the cost of
    one concatenation (the length prefix is cached by the correlation's length).
    """

    __slots__ = ("_constant", "_packed", "_prefixes")

    def __init__(self, constant: bytes):
        self._constant = constant
        self._packed = VariableByteIntegers.encode(len(constant)) + constant
        self._prefixes: dict[int, bytes] = {}

    @classmethod
    def of(cls, properties: Properties) -> PackedProperties:
        """These paho properties, encoded once."""
        packed = properties.pack()
        _, used = VariableByteIntegers.decode(packed)
        return cls(packed[used:])

    def with_correlation(self, correlation: bytes, extra: bytes = b"") -> _Packed:
        """These properties and Correlation Data ``correlation``; ``extra``: more
        properties already encoded (:func:`user_property`)."""
        if extra:
            body = (self._constant + bytes((_CORRELATION_DATA,))
                    + struct.pack("!H", len(correlation)) + correlation + extra)
            return _Packed(VariableByteIntegers.encode(len(body)) + body)
        prefix = self._prefixes.get(len(correlation))
        if prefix is None:
            body_length = len(self._constant) + 3 + len(correlation)
            prefix = self._prefixes[len(correlation)] = (
                VariableByteIntegers.encode(body_length) + self._constant
                + bytes((_CORRELATION_DATA,)) + struct.pack("!H", len(correlation)))
        return _Packed(prefix + correlation)

    def pack(self) -> bytes:
        return self._packed

    def __str__(self) -> str:  # paho's debug log prints the properties
        return f"PackedProperties({len(self._packed)} bytes)"


def user_property(key: str, value: str) -> bytes:
    """One MQTT 5 User Property in its wire form (identifier, then two UTF-8 strings)."""
    k, v = key.encode(), value.encode()
    return bytes((_USER_PROPERTY,)) + struct.pack("!H", len(k)) + k + struct.pack("!H", len(v)) + v


class _Packed:
    """One message's properties, already encoded."""

    __slots__ = ("_packed",)

    def __init__(self, packed: bytes):
        self._packed = packed

    def pack(self) -> bytes:
        return self._packed

    def __str__(self) -> str:
        return f"properties({len(self._packed)} bytes)"


def make_client(broker: BrokerConfig, client_id: str, *, persistent: bool,
                max_inbound: int | None = None) -> paho.Client:
    """A paho client (callback API 2) configured for ``broker``; not yet connected.

    ``persistent`` keeps the broker-side session across connections (MQTT 3.1.1
    ``clean_session=False``; for MQTT 5 see :func:`connect_properties`).
    ``max_inbound`` gives a :class:`GuardedClient` that refuses larger packets.
    """
    protocol = paho.MQTTv5 if is_v5(broker) else paho.MQTTv311
    kwargs = {"client_id": client_id, "protocol": protocol,
              "clean_session": None if is_v5(broker) else not persistent}
    if max_inbound is None:
        client = paho.Client(CallbackAPIVersion.VERSION2, **kwargs)
    else:
        client = GuardedClient(CallbackAPIVersion.VERSION2, max_inbound=max_inbound, **kwargs)
    client.connect_timeout = broker.connect_timeout
    if broker.tls is not None:
        client.tls_set(
            ca_certs=str(broker.tls.ca_file),
            certfile=str(broker.tls.cert_file) if broker.tls.cert_file else None,
            keyfile=str(broker.tls.key_file) if broker.tls.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    if broker.username is not None:
        password = None
        if broker.password_file is not None:
            password = broker.password_file.read_text().strip()
        client.username_pw_set(broker.username, password)
    return client


def connect_properties(broker: BrokerConfig, *, persistent: bool,
                       max_inbound: int | None = None,
                       receive_maximum: int | None = None) -> Properties | None:
    """MQTT 5 CONNECT properties: session expiry, the largest packet we accept (the
    broker then never sends a larger one) and how many QoS 1 messages it may send us
    before our PUBACKs (it holds the rest: a flood cannot pile up in our memory)."""
    if not is_v5(broker):
        return None
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = broker.session_expiry if persistent else 0
    if max_inbound is not None:
        props.MaximumPacketSize = max_inbound
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    return props


def connect(client: paho.Client, broker: BrokerConfig, *, persistent: bool,
            max_inbound: int | None = None, receive_maximum: int | None = None) -> None:
    """Open the connection (blocking up to ``client.connect_timeout`` for TCP, and again
    for TLS) and send CONNECT, or raise; CONNACK comes later."""
    kwargs = {}
    if is_v5(broker):
        kwargs["clean_start"] = not persistent
        kwargs["properties"] = connect_properties(broker, persistent=persistent,
                                                  max_inbound=max_inbound,
                                                  receive_maximum=receive_maximum)
    rc = client.connect(broker.host, broker.port, keepalive=broker.keepalive, **kwargs)
    if rc != paho.MQTTErrorCode.MQTT_ERR_SUCCESS:  # CONNECT could not be written
        raise ConnectionError(paho.error_string(rc))


def tls_handshake(broker: BrokerConfig, listen_s: float = 0.5) -> str | None:
    """A TLS handshake with the broker, as the device makes it (its CA, its certificate),
    and no MQTT: None if it is accepted, else why not. With TLS 1.3 a broker refuses a
    client certificate only after the handshake: the refusal is read for ``listen_s``."""
    tls = broker.tls
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(tls.ca_file))
        if tls.cert_file is not None:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as err:
        return f"cannot load the device's TLS files: {err}"
    try:
        with socket.create_connection((broker.host, broker.port),
                                      timeout=broker.connect_timeout) as raw, \
                context.wrap_socket(raw, server_hostname=broker.host) as sock:
            sock.settimeout(listen_s)
            try:
                if sock.recv(1) == b"":
                    return "the broker closed the connection after the TLS handshake"
            except TimeoutError:
                pass  # waiting for our CONNECT: the certificate was accepted
    except ssl.SSLCertVerificationError as err:
        return f"the broker's certificate is not trusted: {err.verify_message}"
    except (OSError, ssl.SSLError) as err:
        return f"cannot reach it: {err}"
    return None
