"""What is wired to the device: GPIO inputs and outputs, cameras, the 4G modem; and the
checks, the alarm test and the SMS second path that use them."""

from __future__ import annotations

import string
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from croniter import CroniterError, croniter
from pydantic import Field
from pydantic.functional_validators import AfterValidator

from edge.config.base import GpioPin, Identifier, Strict
from edge.runtime.clock import wall_now


def _cron(value: str) -> str:
    if len(value.split()) != 5 or not croniter.is_valid(value):
        raise ValueError(f"{value!r} is not a cron schedule (five fields: minute hour "
                         "day-of-month month day-of-week, e.g. '0 10 * * 1,4' for Monday "
                         "and Thursday at 10:00)")
    try:
        # A valid expression can still name no day at all (31 February): the self-test
        # daemon would fail on its first look at the schedule. 8 years: 29 February.
        now = wall_now()
        croniter(value, now, max_years_between_matches=8).get_next(datetime)
        croniter(value, now, max_years_between_matches=8).get_prev(datetime)
    except CroniterError:
        raise ValueError(f"{value!r} never fires (it names a day that does not exist, such "
                         "as 31 February)") from None
    return value


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
