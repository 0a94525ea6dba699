"""Building a paho-mqtt client from the configuration (TLS, credentials, protocol)."""

from __future__ import annotations

import ssl

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.config import BrokerConfig


def is_v5(broker: BrokerConfig) -> bool:
    return broker.protocol == "5"


def make_client(broker: BrokerConfig, client_id: str, *, persistent: bool) -> paho.Client:
    """A paho client (callback API 2) configured for ``broker``; not yet connected.

    ``persistent`` keeps the broker-side session across connections (MQTT 3.1.1
    ``clean_session=False``; for MQTT 5 see :func:`connect_properties`).
    """
    protocol = paho.MQTTv5 if is_v5(broker) else paho.MQTTv311
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
        clean_session=None if is_v5(broker) else not persistent,
    )
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


def connect_properties(broker: BrokerConfig, *, persistent: bool) -> Properties | None:
    if not is_v5(broker):
        return None
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = broker.session_expiry if persistent else 0
    return props


def connect(client: paho.Client, broker: BrokerConfig, *, persistent: bool) -> None:
    """Open the connection (blocking up to ``connect_timeout``); CONNACK comes later."""
    kwargs = {}
    if is_v5(broker):
        kwargs["clean_start"] = not persistent
        kwargs["properties"] = connect_properties(broker, persistent=persistent)
    client.connect(broker.host, broker.port, keepalive=broker.keepalive, **kwargs)
