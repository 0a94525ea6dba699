"""The device, its broker and its storage: who it is and where its events go."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, model_validator
from pydantic.functional_validators import AfterValidator

from edge.config.base import Identifier, Strict

# Unix socket paths are limited to 107 bytes (108 with the terminating NUL).
_MAX_SOCKET_PATH = 107
_LONGEST_SOCKET_NAME = "button.ctl"


def _time_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (an IANA name such as "
                         "'Asia/Shanghai')") from None
    return value


class DeviceConfig(Strict):
    site_id: Identifier = Field(description="The school or campus, as the platform knows it")
    device_id: Identifier = Field(description="This terminal, unique within the site")
    location: str = Field(min_length=1, max_length=200, description="Human text, e.g. 'South gate'")
    timezone: Annotated[str, AfterValidator(_time_zone)] = Field(
        "Asia/Shanghai",
        description="The site's local time: the test schedule, the monthly report, SMS text",
    )

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class TlsConfig(Strict):
    ca_file: Path = Field(description="CA bundle that signed the broker's certificate")
    cert_file: Path | None = Field(None, description="Client certificate for mutual TLS")
    key_file: Path | None = Field(None, description="Client private key for mutual TLS")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


def _endpoint(value: str) -> str:
    """``host`` or ``host:port`` (``[v6addr]:port`` for an IPv6 address)."""
    host, _ = split_endpoint(value, 1)
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError(f"{value!r} is not host or host:port")
    return value


def split_endpoint(value: str, default_port: int) -> tuple[str, int]:
    """``("mqtt2.example", 8883)`` for ``"mqtt2.example:8883"``; the port is ``default_port``
    when not given; ValueError for a port that is not 1 to 65535."""
    host, port = value, None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else (None if not rest else "x")
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    if port is None:
        return host, default_port
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    return host, int(port)


class BrokerConfig(Strict):
    host: str = Field(min_length=1)
    port: int = Field(8883, ge=1, le=65535)
    alternates: list[Annotated[str, AfterValidator(_endpoint)]] = Field(
        default_factory=list, max_length=8,
        description="Other brokers to move to when the one in use fails, tried in this order "
                    "after host (DB15/T 3968's redundant links): 'host' or 'host:port', "
                    "with host's TLS, credentials and protocol",
    )
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive: int = Field(
        15, ge=5, le=3600,
        description="Seconds between MQTT pings; the broker publishes our will after 1.5 x this "
                    "when the link goes silent",
    )
    client_id: str | None = Field(None, min_length=1, max_length=128)
    username: str | None = None
    password_file: Path | None = None
    tls: TlsConfig | None = None
    session_expiry: int = Field(
        7 * 86400, ge=0, le=0xFFFFFFFF,
        description="MQTT 5 session expiry (s): how long the broker keeps our acks while away",
    )
    connect_timeout: float = Field(
        5.0, gt=0, le=10,
        description="TCP connect and TLS handshake, each; kept well under the watchdog's 60 s",
    )

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """Every broker, the primary first: ``[(host, port), ...]``."""
        return [(self.host, self.port),
                *(split_endpoint(a, self.port) for a in self.alternates)]

    def at(self, host: str, port: int) -> BrokerConfig:
        """This configuration for one of :attr:`endpoints`."""
        return self.model_copy(update={"host": host, "port": port})

    @model_validator(mode="after")
    def _password_needs_user(self) -> BrokerConfig:
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs a username")
        return self


class UplinkConfig(Strict):
    topic_root: str = Field(
        "guardpost/v1", min_length=1, max_length=128, pattern=r"^[^/+#\x00]+(/[^/+#\x00]+)*$",
        description="Versioned root of the topic tree (no wildcards, no leading or trailing '/')",
    )
    inflight_window: int = Field(
        20, ge=1, le=1000,
        description="QoS 1 messages published and not yet acknowledged by the broker",
    )
    heartbeat_interval: float = Field(30.0, ge=1, le=3600)
    max_packet_bytes: int | None = Field(
        None, ge=16_384, le=268_435_455,
        description="The broker's message size limit (Mosquitto: message_size_limit), for "
                    "MQTT 3.1.1, which cannot announce it; a larger snapshot is dropped",
    )
    reconnect_min: float = Field(0.5, gt=0, le=30)
    reconnect_max: float = Field(30.0, gt=0, le=30, description="Backoff cap (s)")
    alarm_reconnect_s: float = Field(
        0.25, ge=0.05, le=30,
        description="While an alarm or a test waits to be published, connection attempts are "
                    "at most this far apart (a new one starts one at once); the backoff "
                    "above applies only when none waits",
    )
    connect_timeout_max: float = Field(
        60.0, ge=10, le=600,
        description="On a slow link (a 4G modem in poor signal) the connect and CONNACK "
                    "timeouts grow from broker.connect_timeout up to this",
    )
    puback_timeout_s: float = Field(
        3.0, ge=0.5, le=60,
        description="An alarm or test without the broker's PUBACK this long (or twice the "
                    "link's round trip, if longer) means a dead link: drop it and reconnect",
    )
    republish_after_s: float = Field(
        10.0, ge=1, le=3600,
        description="An alarm or test the broker took but the platform has not acknowledged "
                    "this long is published again (same id, same bytes) ...",
    )
    republish_max_s: float = Field(
        600.0, ge=1, le=86400,
        description="... with pauses doubling up to this, until acknowledged",
    )
    max_inbound_bytes: int = Field(
        65_536, ge=1024, le=268_435_455,
        description="The largest message accepted from the broker (MQTT 5 tells the broker; "
                    "over MQTT 3.1.1 a larger one is read, dropped and refused)",
    )
    rejections_per_minute: float = Field(
        30.0, gt=0, le=6000,
        description="Refusals answered on 'rejected', on average; beyond it (and the burst) "
                    "they are counted and summarised, not answered one by one",
    )
    rejection_burst: int = Field(10, ge=1, le=1000, description="Refusals answered at once")

    @model_validator(mode="after")
    def _backoff_order(self) -> UplinkConfig:
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        if self.republish_after_s > self.republish_max_s:
            raise ValueError("republish_after_s must not exceed republish_max_s")
        return self


class StorageConfig(Strict):
    database: Path = Path("/var/lib/guardpost/outbox.db")
    runtime_dir: Path = Field(
        Path("/run/guardpost"), description="Local sockets the daemons wake each other through",
    )
    keep_days: int = Field(
        90, ge=1, le=3650,
        description="Delivered events are kept this long (policy asks for 30 to 90 days)",
    )
    spool_dir: Path = Field(
        Path("/var/lib/guardpost/spool"), description="Camera snapshots (JPEG files)",
    )
    spool_budget_mb: int = Field(
        1024, ge=8, le=1_000_000,
        description="Disk the snapshots may use; beyond it the least precious go first",
    )
    alarm_reserve_mb: int = Field(
        16, ge=1, le=1024,
        description="Disk kept allocated for alarms (outbox.db.reserve): given back when the "
        "disk is full, so alarms are still recorded; 16 MB hold at least 800 alarms",
    )

    @model_validator(mode="after")
    def _socket_paths_fit(self) -> StorageConfig:
        longest = self.runtime_dir / _LONGEST_SOCKET_NAME
        if len(str(longest).encode()) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"runtime_dir is too long for a Unix socket path ({longest} is over "
                f"{_MAX_SOCKET_PATH} bytes)"
            )
        return self
