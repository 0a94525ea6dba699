"""The configuration: one TOML file, validated once at start.

Every daemon and tool loads it through :func:`load_config`. A bad file raises
:class:`ConfigError` carrying one line per problem, each naming the key path
(``inputs.gate.pin: ...``); the entry point prints them and exits with
:data:`EX_CONFIG` (78), which the systemd units list in
``RestartPreventExitStatus`` so that a typo never becomes a restart loop.
"""

from __future__ import annotations

import hashlib
import os
import string
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.functional_validators import AfterValidator

from edge.contract.events import Identity

EX_CONFIG = 78  # sysexits.h: configuration error

# Unix socket paths are limited to 107 bytes (108 with the terminating NUL).
_MAX_SOCKET_PATH = 107
_LONGEST_SOCKET_NAME = "button.ctl"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one line per error."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _topic_safe(value: str) -> str:
    # Identifiers become MQTT topic levels: wildcards or separators in them
    # would let one device publish into another's subtree.
    for forbidden in ("/", "+", "#", "\x00"):
        if forbidden in value:
            raise ValueError(f"must not contain {forbidden!r} (it becomes an MQTT topic level)")
    return value


Identifier = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"),
    AfterValidator(_topic_safe),
]
GpioPin = Annotated[int, Field(ge=0, le=53, description="BCM GPIO number")]


class Strict(BaseModel):
    """Base of every section: unknown keys are refused, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _time_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (an IANA name such as "
                         "'Asia/Shanghai')") from None
    return value


def _cron(value: str) -> str:
    if len(value.split()) != 5 or not croniter.is_valid(value):
        raise ValueError(f"{value!r} is not a cron schedule (five fields: minute hour "
                         "day-of-month month day-of-week, e.g. '0 10 * * 1,4' for Monday "
                         "and Thursday at 10:00)")
    try:
        # A valid expression can still name no day at all (31 February): the self-test
        # daemon would fail on its first look at the schedule. 8 years: 29 February.
        now = datetime.now(UTC)
        croniter(value, now, max_years_between_matches=8).get_next(datetime)
        croniter(value, now, max_years_between_matches=8).get_prev(datetime)
    except CroniterError:
        raise ValueError(f"{value!r} never fires (it names a day that does not exist, such "
                         "as 31 February)") from None
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


class BrokerConfig(Strict):
    host: str = Field(min_length=1)
    port: int = Field(8883, ge=1, le=65535)
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

    @model_validator(mode="after")
    def _socket_paths_fit(self) -> StorageConfig:
        longest = self.runtime_dir / _LONGEST_SOCKET_NAME
        if len(str(longest).encode()) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"runtime_dir is too long for a Unix socket path ({longest} is over "
                f"{_MAX_SOCKET_PATH} bytes)"
            )
        return self


def _pin_factory(value: str) -> str:
    if value == "rpigpio":
        # gpiozero's RPi.GPIO pins (and rpi-lgpio, the RPi.GPIO shim) get no edge timestamps:
        # an edge is timed when its callback runs, and a 25 ms press whose first callback
        # ran 16 ms late measures 9 ms, a "glitch" that is ignored.
        raise ValueError("'rpigpio' is refused: RPi.GPIO reports no edge times, so a short "
                         "press whose callback runs late is measured too short and ignored. "
                         "Use 'lgpio' (apt install python3-lgpio): it works on every "
                         "Raspberry Pi model, with the kernel's own edge timestamps")
    if value not in ("lgpio", "mock"):
        raise ValueError(f"{value!r} is not a pin factory: 'lgpio' (a Raspberry Pi, any "
                         "model) or 'mock' (simulation)")
    return value


class GpioConfig(Strict):
    pin_factory: Annotated[str, AfterValidator(_pin_factory)] = Field(
        "lgpio",
        description="lgpio on every Raspberry Pi model (the only one that times edges in the "
                    "kernel); mock for simulation. rpigpio is refused",
    )
    chip: int | None = Field(None, ge=0, le=16, description="lgpio gpiochip; default: detect")


class InputConfig(Strict):
    pin: GpioPin
    contact: Literal["normally-open", "normally-closed"] = "normally-open"
    pull: Literal["up", "down"] = "up"
    mode: Literal["panic", "silent", "audible"] = Field(
        "panic", description="Contact ID 120 panic, 122 silent panic (no buzzer), 123 audible",
    )
    min_press_ms: int = Field(
        10, ge=0, le=20,
        description="Shorter pulses are glitches; at most 20 so a 20 ms press is never missed",
    )
    bounce_ms: int = Field(
        5, ge=0, le=10,
        description="An opening of the contact shorter than this is contact bounce, not a "
                    "release: it neither shortens a press nor makes a held button repeat",
    )
    hold_ms: int = Field(
        0, ge=0, le=5000, description="Optional guard against accidental presses; 0 = none",
    )
    label: str | None = Field(None, max_length=100)
    supervision_pin: GpioPin | None = Field(
        None,
        description="Input of a supervision loop run in the button's cable (a wire pair "
                    "looped at the button): open means the cable is cut or unplugged",
    )


class OutputConfig(Strict):
    pin: GpioPin
    active_high: bool = True


class TestRelayConfig(OutputConfig):
    """A relay whose contact is wired across the panic button's (in parallel with a
    normally-open button, in series with a normally-closed loop): energised, it makes
    the input see a press, so an alarm test exercises the real wiring."""

    input: Identifier | None = Field(
        None, description="The panic input it is wired to; may be left out with one input",
    )
    pulse_ms: int = Field(
        300, ge=50, le=2000,
        description="How long the relay is energised; a press seen longer than this (plus "
                    "bounce) is a person holding the button: an alarm, not the test",
    )
    release_ms: int = Field(
        30, ge=5, le=200,
        description="How long the relay's contact may take to open (and stop bouncing) "
                    "after the pulse; activity on the input after that is a person's. Too "
                    "short: every test is an ALARM; a module with a flyback diode may need 50",
    )


class SirenConfig(OutputConfig):
    """A siren or strobe relay: sounds on a new alarm of an input whose mode is
    ``audible`` (Contact ID 123), never for ``silent`` (122) or ``panic`` (120) inputs."""

    sound_for_s: float = Field(
        180, ge=0, le=3600,
        description="How long it sounds; 0 = until the alarm is reset (guardpost reset)",
    )


class OutputsConfig(Strict):
    status_led: OutputConfig | None = None
    buzzer: OutputConfig | None = None
    siren: SirenConfig | None = None
    test_relay: TestRelayConfig | None = None


class CameraConfig(Strict):
    source: str = Field(
        min_length=1,
        description="rtsp://user:password@host/path, /dev/videoN, or a video file (simulation)",
    )
    label: str | None = Field(None, max_length=100)
    pre_seconds: float = Field(30, ge=0, le=120, description="Snapshots before the press")
    post_count: int = Field(10, ge=0, le=120, description="Snapshots after the press")
    rate: float = Field(1.0, gt=0, le=10, description="Snapshots per second")
    width: int = Field(1280, ge=0, le=3840, description="Snapshot width; 0 = as captured")
    jpeg_quality: int = Field(80, ge=30, le=95)
    max_jpeg_bytes: int = Field(250_000, ge=10_000, le=10_000_000)
    loop: bool = Field(False, description="Play a file source again when it ends (simulation)")
    stale_after_s: float = Field(10, ge=1, le=600, description="No frame this long: a fault")
    frozen_after_s: float = Field(30, ge=0.5, le=3600, description="Identical frames this long")
    black_below: float = Field(12, ge=0, le=255, description="Mean brightness of a black image")
    covered_below: float = Field(4, ge=0, le=128,
                                 description="Brightness spread of a covered lens")
    fault_after_s: float = Field(5, ge=0, le=600,
                                 description="A bad picture this long raises the fault")
    restore_after_s: float = Field(10, ge=0, le=3600,
                                   description="A good picture this long restores it")
    check_interval_s: float = Field(2, ge=0.1, le=60, description="How often it is examined")


class HealthConfig(Strict):
    """The self-test daemon's periodic checks (``guardpost run selftest``)."""

    interval_s: float = Field(300, ge=5, le=86400, description="Seconds between check runs")
    fail_after: int = Field(
        2, ge=1, le=20,
        description="Failing runs, of the last fail_after + restore_after, that raise a fault",
    )
    restore_after: int = Field(
        3, ge=1, le=50, description="Consecutive passing runs before the fault is restored",
    )
    max_unsent_age_s: float = Field(
        300, ge=10, le=86400, description="The oldest unsent event may wait this long",
    )
    min_free_mb: int = Field(200, ge=1, le=1_000_000, description="Free disk for the database")
    max_cpu_celsius: float = Field(80, ge=40, le=110)
    integrity_hour: int = Field(
        3, ge=0, le=23, description="Local hour of the daily database integrity check",
    )


class AlarmTestConfig(Strict):
    """The end-to-end alarm test: the test relay pulses the panic input."""

    schedule: Annotated[str, AfterValidator(_cron)] = Field(
        "0 10 1 * *",
        description="Cron schedule in the site's time zone; default the 1st of each month "
                    "at 10:00 (a county testing twice a week: '0 10 * * 1,4')",
    )
    ack_timeout_s: float = Field(
        30, ge=1, le=600, description="The platform must acknowledge the test within this",
    )
    min_interval_s: float = Field(
        60, ge=0, le=86400,
        description="Tests the platform asks for (cmd/test) run at least this far apart; one "
                    "asked for sooner is refused, saying how long to wait",
    )
    catch_up_hours: float = Field(
        24, ge=0, le=24 * 31,
        description="A slot missed (device off, clock not yet synchronised) still runs "
                    "this long after its time",
    )
    software_without_relay: bool = Field(
        True,
        description="Without a test relay, inject the test in software (it is labelled as "
                    "not covering the wiring); false: such a test fails",
    )


class ModemConfig(Strict):
    """The 4G module of the SMS second path (Quectel EC2x/EG25, SIMCom SIM7600)."""

    port: Path = Field(description="Its AT command port, e.g. /dev/ttyUSB2 (Quectel)")
    baudrate: int = Field(115200, ge=1200, le=4_000_000)
    pin: str | None = Field(
        None, pattern=r"^[0-9]{4,8}$",
        description="SIM PIN, if the SIM has one; a rejected PIN is never tried again (a "
                    "third wrong PIN locks the SIM)",
    )
    command_timeout_s: float = Field(5, ge=0.5, le=60)
    # The fallback daemon pings systemd's watchdog after every exchange with the module;
    # the longest is one SMS part. Its unit has WatchdogSec=150: this cap keeps the
    # longest silence under half of that, with room to spare.
    sms_timeout_s: float = Field(
        60, ge=5, le=60,
        description="One SMS part to be accepted (at most 60 s: the daemon's watchdog)")
    status_interval_s: float = Field(
        60, ge=5, le=3600, description="How often SIM, registration and signal are read",
    )


# Placeholders of the SMS template, each filled from the alarm.
SMS_FIELDS = ("site", "device", "location", "time", "input", "label", "what", "code",
              "event_id", "timeout", "count")
DEFAULT_SMS_TEMPLATE = ("【校园一键报警】{location}{label}于{time}触发{what}（{count}起），"
                        "110平台{timeout}秒内未确认，请立即处置。事件编号{event_id}")


def _sms_template(value: str) -> str:
    for _, name, spec, conversion in string.Formatter().parse(value):
        if name is not None and name not in SMS_FIELDS:
            raise ValueError(f"unknown placeholder {{{name}}}; known: "
                             + ", ".join(f"{{{f}}}" for f in SMS_FIELDS))
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}} takes no format or conversion")
    return value


class FallbackConfig(Strict):
    """The second path: an SMS to the duty numbers when the platform is silent."""

    duty_numbers: list[Annotated[str, Field(pattern=r"^\+?[0-9]{3,20}$")]] = Field(
        min_length=1, max_length=10,
        description="Who is told: the school's security office, the local police station",
    )
    ack_timeout_s: float = Field(
        10, ge=1, le=600,
        description="An alarm the platform has not acknowledged this long goes out by SMS "
                    "(at once while the uplink is down)",
    )
    template: Annotated[str, AfterValidator(_sms_template)] = Field(
        DEFAULT_SMS_TEMPLATE, min_length=1, max_length=600)
    max_sms_per_hour: int = Field(
        30, ge=1, le=1000,
        description="Beyond this, alarms wait and go together in the next allowed SMS",
    )
    retry_s: float = Field(
        30, ge=1, le=3600,
        description="A refused SMS is tried again after this; while the modem cannot send "
                    "at all, the pause doubles from it up to 5 minutes")
    max_attempts: int = Field(
        10, ge=1, le=100,
        description="Refusals of one number's SMS before that number is given up (a modem "
                    "that cannot send at all is not counted)")


class Config(Strict):
    """The whole configuration file."""

    device: DeviceConfig
    broker: BrokerConfig
    uplink: UplinkConfig = UplinkConfig()
    storage: StorageConfig = StorageConfig()
    gpio: GpioConfig
    inputs: dict[Identifier, InputConfig] = Field(min_length=1)
    outputs: OutputsConfig = OutputsConfig()
    cameras: dict[Identifier, CameraConfig] = Field(default_factory=dict)
    health: HealthConfig = HealthConfig()
    alarm_test: AlarmTestConfig = AlarmTestConfig()
    modem: ModemConfig | None = None
    fallback: FallbackConfig | None = None

    @model_validator(mode="after")
    def _fallback_needs_modem(self) -> Config:
        if self.fallback is not None and self.modem is None:
            raise ValueError("fallback: needs a [modem] to send its SMS through")
        return self

    @model_validator(mode="after")
    def _test_relay_input(self) -> Config:
        relay = self.outputs.test_relay
        if relay is None:
            return self
        if relay.input is None and len(self.inputs) > 1:
            raise ValueError("outputs.test_relay.input: required with more than one input "
                             f"(one of {', '.join(sorted(self.inputs))})")
        if relay.input is not None and relay.input not in self.inputs:
            raise ValueError(f"outputs.test_relay.input: no input {relay.input!r} "
                             f"(inputs: {', '.join(sorted(self.inputs))})")
        spec = self.inputs[relay.input or next(iter(self.inputs))]
        needed = max(spec.min_press_ms, spec.hold_ms) + 50
        if relay.pulse_ms < needed:
            raise ValueError(f"outputs.test_relay.pulse_ms: must be at least {needed} (the "
                             "input's min_press_ms or hold_ms, plus 50) for the pulse to "
                             "count as a press")
        return self

    @property
    def test_input(self) -> str | None:
        """The panic input the test relay is wired to, if there is a relay."""
        relay = self.outputs.test_relay
        if relay is None:
            return None
        return relay.input or next(iter(self.inputs))

    @model_validator(mode="after")
    def _pins_used_once(self) -> Config:
        users = [(f"inputs.{name}", spec.pin) for name, spec in self.inputs.items()]
        users += [(f"inputs.{name}.supervision_pin", spec.supervision_pin)
                  for name, spec in self.inputs.items() if spec.supervision_pin is not None]
        users += [(f"outputs.{name}", spec.pin) for name in OutputsConfig.model_fields
                  if (spec := getattr(self.outputs, name)) is not None]
        owners: dict[int, str] = {}
        for key, pin in users:
            if pin in owners:
                raise ValueError(f"GPIO {pin} is used by both {owners[pin]} and {key}")
            owners[pin] = key
        return self

    @property
    def client_id(self) -> str:
        return self.broker.client_id or f"gp-{self.device.site_id}-{self.device.device_id}"

    @property
    def identity(self) -> Identity:
        """Who reports: copied into every payload."""
        d = self.device
        return Identity(site_id=d.site_id, device_id=d.device_id, location=d.location)

    @property
    def topic_prefix(self) -> str:
        """``{root}/{site_id}/{device_id}``: this device's subtree."""
        return f"{self.uplink.topic_root}/{self.device.site_id}/{self.device.device_id}"

    @property
    def simulated(self) -> bool:
        return self.gpio.pin_factory == "mock"

    def fingerprint(self) -> str:
        """Short hash of the effective configuration (comments and layout do not count)."""
        canonical = self.model_dump_json(exclude_none=False).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]


CREDENTIAL_PREFIX = "credential:"


@dataclass(frozen=True)
class CredentialStore:
    """Where ``credential:NAME`` paths of the configuration point."""

    directory: Path
    file_prefix: str = ""

    def path(self, name: str) -> Path:
        return self.directory / f"{self.file_prefix}{name}"


def credential_store(config_path: Path, environ: dict | None = None) -> CredentialStore:
    """systemd's private copy when run as a unit (``LoadCredential=gp:/etc/guardpost/
    credentials`` names each file ``gp_{name}``), else ``credentials/`` beside the
    configuration file, for commands an installer runs by hand as root."""
    env = os.environ if environ is None else environ
    if env.get("CREDENTIALS_DIRECTORY"):
        return CredentialStore(Path(env["CREDENTIALS_DIRECTORY"]), "gp_")
    return CredentialStore(Path(config_path).resolve().parent / "credentials")


def _resolve_credentials(config: Config, store: CredentialStore) -> Config:
    def resolve(path: Path | None) -> Path | None:
        if path is None or not str(path).startswith(CREDENTIAL_PREFIX):
            return path
        return store.path(str(path)[len(CREDENTIAL_PREFIX):])

    broker = config.broker.model_copy(
        update={"password_file": resolve(config.broker.password_file)})
    if broker.tls is not None:
        tls = broker.tls.model_copy(update={name: resolve(getattr(broker.tls, name))
                                            for name in ("ca_file", "cert_file", "key_file")})
        broker = broker.model_copy(update={"tls": tls})
    return config.model_copy(update={"broker": broker})


def _check_files(config: Config) -> list[str]:
    """Files the configuration names must be readable now, not at the first alarm."""
    problems = []
    named: list[tuple[str, Path | None]] = [("broker.password_file", config.broker.password_file)]
    if config.broker.tls is not None:
        tls = config.broker.tls
        named += [("broker.tls.ca_file", tls.ca_file), ("broker.tls.cert_file", tls.cert_file),
                  ("broker.tls.key_file", tls.key_file)]
    for key, path in named:
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            problems.append(f"{key}: cannot read {path}: {err.strerror}")
    return problems


def _describe(error: dict) -> str:
    location = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (not part of the configuration; check the spelling)"
    elif error["type"] == "missing":
        message = "required key is missing"
    # Cross-field rules of the whole file name their keys in the message itself.
    return f"{location}: {message}" if location else message


def _keys_with_nul(value, key: str = "") -> list[str]:
    if isinstance(value, str):
        return [key or "(value)"] if "\x00" in value else []
    if isinstance(value, dict):
        found = [f"{key}.{k}" if key else str(k) for k in value if "\x00" in str(k)]
        for name, item in value.items():
            found += _keys_with_nul(item, f"{key}.{name}" if key else str(name))
        return found
    if isinstance(value, list):
        return [k for index, item in enumerate(value)
                for k in _keys_with_nul(item, f"{key}[{index}]")]
    return []


def parse_config(data: dict, source: str = "<config>",
                 credentials: CredentialStore | None = None,
                 check_broker_files: bool = True) -> Config:
    """Validate an already-parsed TOML document; ``credential:NAME`` paths are resolved
    in ``credentials`` (see :func:`credential_store`).

    ``check_broker_files=False`` is for everything that never talks to the broker (the
    button daemon above all): the alarm path must not depend on the uplink's secrets,
    which it cannot even read, nor on a certificate the platform has not issued yet.
    """
    nul = [f"{key}: contains a NUL character" for key in _keys_with_nul(data)]
    if nul:
        # No path, host, topic or text may hold one: the C libraries underneath (the file
        # system, SQLite, OpenCV) refuse it, and MQTT strings must not contain it.
        raise ConfigError(source, nul)
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, [_describe(e) for e in err.errors()]) from None
    if credentials is not None:
        config = _resolve_credentials(config, credentials)
    problems = _check_files(config) if check_broker_files else []
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: str | Path, *, check_broker_files: bool = True) -> Config:
    """Read and validate the TOML file at ``path``; raise :class:`ConfigError` on any problem."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(source, [f"(file): cannot read: {err.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(source, [f"(file): not UTF-8 text: {err}"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(source, [f"(file): TOML syntax error: {err}"]) from None
    return parse_config(data, source, credentials=credential_store(Path(path)),
                        check_broker_files=check_broker_files)
