"""The device's periodic health checks, and the hysteresis that turns them into events.

Each check answers ``ok`` True, False, or None when it does not apply here (no sensor on
this board, nothing configured). The self-test daemon runs them every
``health.interval_s``; :class:`CheckTracker` raises a fault once ``fail_after`` of the
recent runs failed and a restore after ``restore_after`` consecutive passes, so a
flapping check raises one fault and no storm of events.

The checks read what the other daemons record in the outbox (their ``daemon_state``)
or ask them over their control sockets: the self-test daemon owns no hardware and no
network connection of its own.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from drivers import board
from edge.config import Config
from edge.contract.events import ContactId, utc_now
from edge.runtime.clock import clock_synchronised
from edge.runtime.control import ControlUnavailable
from edge.runtime.control import request as control_request
from edge.store.outbox import Outbox
from edge.store.reserve import MIB, SpaceReserve, alarms_per_reserve

log = logging.getLogger(__name__)

BUTTON_TIMEOUT_S = 3.0  # a daemon's control socket answers at once, or is stuck
# The Contact ID of each check's fault where it is not 307 (self-test failure); the
# checks take theirs from here too, so a crashed check's fault matches its restore.
CERT_WARN_DAYS = 30  # a fault this long before a certificate expires

CHECK_CODES = {"wiring": ContactId.PANIC_ZONE_TROUBLE,
               "disk": ContactId.SYSTEM_TROUBLE,
               "database": ContactId.SYSTEM_TROUBLE,
               "broker": ContactId.COMMUNICATION_TROUBLE,
               "outbox": ContactId.FAILURE_TO_COMMUNICATE,
               "camera": ContactId.PERIPHERAL_TROUBLE,
               "modem": ContactId.COMMUNICATION_TROUBLE}


@dataclass
class CheckResult:
    name: str
    ok: bool | None          # None: does not apply on this device
    summary: str
    code: int = ContactId.SELF_TEST_FAILURE  # the Contact ID of its fault
    value: dict[str, Any] = field(default_factory=dict)
    # A failure that is a fact, not a reading that may flap (the alarm reserve drawn on,
    # a damaged outbox moved aside): its fault goes out at the first run.
    at_once: bool = False


def _parsed(state: str) -> dict | None:
    """A daemon's saved state; None if unreadable, so that only the checks reading that
    daemon's state fail (with "could not run"), not every check reading any state."""
    try:
        value = json.loads(state)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _age_s(stamp: str | None, now: datetime) -> float | None:
    if not stamp:
        return None
    return (now - datetime.fromisoformat(stamp)).total_seconds()


class HealthChecks:
    """Every check of the device, run in one go by :meth:`run`."""

    def __init__(self, config: Config, outbox: Outbox, *, sys_root: Path = Path("/"),
                 clock: Callable[[], datetime] = utc_now,
                 clock_synced: Callable[[], bool] = clock_synchronised):
        self.config = config
        self.outbox = outbox
        self.sys_root = sys_root
        self.clock = clock
        self.clock_synced = clock_synced
        self.integrity: dict | None = None  # the last quick_check: {"at", "ok", "detail"}

    def run(self, *, integrity_due: bool = False) -> list[CheckResult]:
        """Every check, each on its own: one that raises (a corrupt database file, a
        surprise from a sensor) is a failed check of its own, never the end of the rest."""
        now = self.clock()
        button = self._button_status()
        states: dict | None = None

        def daemon_states() -> dict:
            nonlocal states
            if states is None:
                states = {name: (_parsed(state), updated)
                          for name, (state, updated) in self.outbox.daemons.all().items()}
            return states

        checks: list[tuple[str, Callable[[], CheckResult]]] = [
            ("button", lambda: self.check_button(button)),
            ("wiring", lambda: self.check_wiring(button)),
            ("broker", lambda: self.check_broker(daemon_states(), now)),
            ("outbox", lambda: self.check_outbox(now)),
            ("disk", self.check_disk),
            ("database", lambda: self.check_database(integrity_due, now)),
            ("clock", self.check_clock),
            ("certificates", lambda: self.check_certificates(now)),
            ("cpu-temperature", self.check_temperature),
            ("power", self.check_power),
            ("camera", lambda: self.check_cameras(daemon_states(), now)),
            ("modem", lambda: self.check_modem(daemon_states(), now)),
        ]
        results = []
        for name, check in checks:
            try:
                results.append(check())
            except Exception as err:
                log.exception("health check %s could not run", name)
                # With its own Contact ID: its restore, later, must match this fault.
                results.append(CheckResult(name, False, f"the check could not run: {err!r}",
                                           CHECK_CODES.get(name, ContactId.SELF_TEST_FAILURE)))
        return results

    # -- the alarm path ----------------------------------------------------------------

    def _button_status(self) -> dict | None:
        try:
            answer = control_request(self.config.storage.runtime_dir / "button.ctl",
                                     {"op": "status"}, timeout=BUTTON_TIMEOUT_S)
        except (ControlUnavailable, OSError, ValueError):
            return None
        return answer if answer.get("ok") else None

    def check_button(self, status: dict | None) -> CheckResult:
        if status is None:
            return CheckResult("button", False, "the button daemon is not answering: presses "
                               "are not being read")
        if status.get("unrecorded_presses"):
            return CheckResult("button", False, f"{status['unrecorded_presses']} press(es) "
                               "not yet recorded (the outbox refuses writes)",
                               value={"unrecorded": status["unrecorded_presses"]})
        return CheckResult("button", True, f"reading {len(status.get('inputs', {}))} "
                           "panic input(s)", value={"led": status.get("led")})

    def check_wiring(self, status: dict | None) -> CheckResult:
        supervised = [n for n, spec in self.config.inputs.items()
                      if spec.supervision_pin is not None]
        code = CHECK_CODES["wiring"]
        if not supervised:
            return CheckResult("wiring", None, "no supervision loop is wired", code)
        if status is None:
            return CheckResult("wiring", False, "cannot read the supervision loops: the "
                               "button daemon is not answering", code)
        wiring = status.get("wiring", {})
        cut = sorted(name for name in supervised if wiring.get(name) != "ok")
        if cut:
            return CheckResult("wiring", False, f"supervision loop open on {', '.join(cut)}: "
                               "the button's cable is cut or unplugged", code, {"open": cut})
        return CheckResult("wiring", True, f"{len(supervised)} supervision loop(s) closed", code)

    def check_broker(self, states: dict, now: datetime) -> CheckResult:
        code = CHECK_CODES["broker"]
        if "uplink" not in states:
            return CheckResult("broker", False, "the uplink has never run", code)
        state, _ = states["uplink"]
        rtt_age = _age_s(state.get("rtt_at"), now)
        fresh = 3 * state.get("heartbeat_interval", 30) + 10
        value = {"rtt_ms": state.get("broker_rtt_ms"), "rtt_age_s": rtt_age}
        if not state.get("connected"):
            return CheckResult("broker", False, "not connected to the broker: "
                               f"{state.get('last_error') or 'no reason recorded'}", code, value)
        connected_for = _age_s(state.get("connected_at"), now)
        if rtt_age is None and connected_for is not None and connected_for <= fresh:
            return CheckResult("broker", True, "connected; first round trip not yet timed",
                               code, value)
        if rtt_age is None or rtt_age > fresh:
            return CheckResult("broker", False, "no round trip to the broker for "
                               f"{'ever' if rtt_age is None else f'{rtt_age:.0f} s'}",
                               code, value)
        return CheckResult("broker", True, f"round trip {state['broker_rtt_ms']:.1f} ms",
                           code, value)

    def check_outbox(self, now: datetime) -> CheckResult:
        backlog = self.outbox.backlog(now)
        age, limit = backlog["oldest_unsent_age_s"], self.config.health.max_unsent_age_s
        code = CHECK_CODES["outbox"]
        if age is not None and age > limit:
            return CheckResult("outbox", False, f"{backlog['queued']} event(s) unsent, the "
                               f"oldest for {age:.0f} s (limit {limit:g} s)", code, backlog)
        return CheckResult("outbox", True, f"{backlog['queued']} event(s) waiting", code, backlog)

    # -- the device --------------------------------------------------------------------

    def check_disk(self) -> CheckResult:
        """Free space, and the alarm reserve (:mod:`edge.store.reserve`): filled again
        here when there is room; while part of it is given back, the disk is full."""
        reserve = SpaceReserve.of(self.config.storage)
        reserve.fill()
        space = board.disk_space(Path(self.config.storage.database).parent)
        free_mb = space.free_bytes / 1024 / 1024
        held = reserve.held()
        value = {"free_mb": round(free_mb, 1), "total_mb": round(space.total_bytes / 2**20, 1),
                 "reserve_mb": round(held / MIB, 2),
                 "reserve_alarms": alarms_per_reserve(held)}
        if reserve.short():
            return CheckResult("disk", False, f"disk full: the alarm reserve holds "
                               f"{held / MIB:.1f} of {reserve.size / MIB:.0f} MB (about "
                               f"{alarms_per_reserve(held)} more alarms); pictures and "
                               "telemetry wait", ContactId.SYSTEM_TROUBLE, value,
                               at_once=True)
        if free_mb < self.config.health.min_free_mb:
            return CheckResult("disk", False, f"only {free_mb:,.0f} MB free (at least "
                               f"{self.config.health.min_free_mb} MB)", ContactId.SYSTEM_TROUBLE,
                               value)
        return CheckResult("disk", True, f"{free_mb:,.0f} MB free", ContactId.SYSTEM_TROUBLE,
                           value)

    def check_database(self, due: bool, now: datetime) -> CheckResult:
        """``PRAGMA quick_check`` at start and once a day (it reads the whole file, so
        not every run). A damaged file is moved aside at once and a new one opened
        (:meth:`edge.store.outbox.Outbox.repair`); what can be read of it comes back."""
        if due or self.integrity is None:
            try:
                rows = self.outbox.integrity_check(5)
            except sqlite3.DatabaseError as err:  # a header or a root page unreadable
                rows = [str(err)]
            self.integrity = {"at": now.isoformat(), "ok": rows == ["ok"],
                              "detail": "; ".join(rows)}
            if rows != ["ok"]:
                self.outbox.repair(f"integrity check failed: {self.integrity['detail']}")
                self.integrity["detail"] += "; moved aside, a new outbox opened"
        if self.integrity["ok"]:
            return CheckResult("database", True, "integrity check passed",
                               ContactId.SYSTEM_TROUBLE,
                               value={"checked_at": self.integrity["at"]})
        return CheckResult("database", False, f"integrity check failed: "
                           f"{self.integrity['detail']}", ContactId.SYSTEM_TROUBLE,
                           value={"checked_at": self.integrity["at"]}, at_once=True)

    def check_certificates(self, now: datetime) -> CheckResult:
        """The device's client certificate and the CA it trusts: a fault
        ``CERT_WARN_DAYS`` before either expires (a device whose certificate lapsed is
        refused by the broker and falls silent), and once one has."""
        tls = self.config.broker.tls
        if tls is None:
            return CheckResult("certificates", None, "no TLS configured")
        ends = {}
        for label, path in (("device certificate", tls.cert_file), ("CA", tls.ca_file)):
            if path is None:
                continue
            try:
                certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())
            except (OSError, ValueError) as err:
                return CheckResult("certificates", False, f"{label} {path} cannot be read: "
                                   f"{type(err).__name__}")
            ends[label] = certificate.not_valid_after_utc
        label, end = min(ends.items(), key=lambda item: item[1])
        days = (end - now).total_seconds() / 86400
        value = {name: when.isoformat() for name, when in ends.items()}
        if days < 0:
            return CheckResult("certificates", False, f"the {label} expired on "
                               f"{end.date()}: the broker will refuse the device", value=value)
        if days < CERT_WARN_DAYS:
            return CheckResult("certificates", False, f"the {label} expires in {days:.0f} "
                               f"day(s), on {end.date()}: renew it", value=value)
        return CheckResult("certificates", True, f"valid for {days:.0f} more day(s) (the "
                           f"{label} ends first)", value=value)

    def check_clock(self) -> CheckResult:
        if self.clock_synced():
            return CheckResult("clock", True, "synchronised")
        return CheckResult("clock", False, "not synchronised (NTP): event times are doubtful")

    def check_temperature(self) -> CheckResult:
        reading = board.cpu_temperature(self.sys_root)
        if not reading.available:
            return CheckResult("cpu-temperature", None, reading.reason or "not reported")
        limit = self.config.health.max_cpu_celsius
        value = {"celsius": reading.celsius}
        if reading.celsius > limit:
            return CheckResult("cpu-temperature", False, f"CPU at {reading.celsius:.1f} °C "
                               f"(limit {limit:g} °C)", value=value)
        return CheckResult("cpu-temperature", True, f"{reading.celsius:.1f} °C", value=value)

    def check_power(self) -> CheckResult:
        # Under a fake root (tests, a mounted image), never ask this host's own vcgencmd.
        vcgencmd = None if self.sys_root == Path("/") else str(self.sys_root / "usr/bin/vcgencmd")
        power = board.power_status(self.sys_root, vcgencmd=vcgencmd)
        if not power.available:
            return CheckResult("power", None, power.reason or "not reported")
        value = {k: v for k, v in asdict(power).items() if isinstance(v, bool | int)}
        problems = [text for flag, text in ((power.under_voltage_now, "under-voltage"),
                                            (power.throttled_now, "throttled"))
                    if flag]
        if problems:
            return CheckResult("power", False, f"{' and '.join(problems)} now: check the "
                               "power supply", value=value)
        note = " (under-voltage earlier since boot)" if power.under_voltage_since_boot else ""
        if power.raw is None:
            note += " (throttling not reported)"
        return CheckResult("power", True, f"supply good{note}", value=value)

    # -- other daemons' parts ----------------------------------------------------------

    def check_cameras(self, states: dict, now: datetime) -> CheckResult:
        """The camera daemon answers; each camera's own faults (330) are raised by it."""
        code = CHECK_CODES["camera"]
        if not self.config.cameras:
            return CheckResult("camera", None, "no camera configured", code)
        try:
            answer = control_request(self.config.storage.runtime_dir / "camera.ctl",
                                     {"op": "status"}, timeout=BUTTON_TIMEOUT_S)
        except (ControlUnavailable, OSError, ValueError) as err:
            return CheckResult("camera", False, f"the camera daemon is not answering ({err})",
                               code)
        cameras = answer.get("cameras", {})
        bad = sorted(name for name, cam in cameras.items() if cam.get("fault"))
        summary = (f"{len(cameras) - len(bad)} of {len(cameras)} camera(s) good"
                   + (f"; fault on {', '.join(bad)}" if bad else ""))
        return CheckResult("camera", True, summary, code, {"faults": bad})

    def check_modem(self, states: dict, now: datetime) -> CheckResult:
        """The SMS path: the modem answers, its SIM is ready, it is registered."""
        code = CHECK_CODES["modem"]
        if self.config.modem is None or self.config.fallback is None:
            return CheckResult("modem", None, "no modem configured", code)
        if "fallback" not in states:
            return CheckResult("modem", False, "the fallback daemon has never run", code)
        state, updated = states["fallback"]
        age = _age_s(updated, now)
        if age is None or age > 3 * self.config.modem.status_interval_s + 30:
            return CheckResult("modem", False, "the fallback daemon has not reported for "
                               f"{age:.0f} s", code)
        modem = state.get("modem", {})
        value = {k: modem.get(k) for k in ("sim", "registration", "signal_dbm", "operator")}
        if not modem.get("present"):
            return CheckResult("modem", False, f"the modem does not answer: "
                               f"{modem.get('error')}", code, value)
        if modem.get("problems"):
            return CheckResult("modem", False, "; ".join(modem["problems"]), code, value)
        signal = (f"{modem['signal_dbm']} dBm" if modem.get("signal_dbm") is not None
                  else "unknown")
        return CheckResult("modem", True, f"SIM ready, registered ({modem.get('registration')}, "
                           f"{modem.get('operator') or 'operator unknown'}), signal {signal}",
                           code, value)


class CheckTracker:
    """Hysteresis for every check; its state survives restarts (saved by the caller).

    A fault is raised when ``fail_after`` of the last ``fail_after + restore_after`` runs
    failed, so a check that fails every other run (a loose connector) raises its one
    fault instead of hiding for ever; it is restored only after ``restore_after``
    consecutive passes, so flapping never becomes a storm of fault/restore pairs. A
    check that stops applying (``ok`` None) while faulted is restored only after as
    many runs of not applying: one unreadable sensor reading does not clear a fault.
    """

    def __init__(self, fail_after: int, restore_after: int, saved: dict | None = None):
        self.fail_after = fail_after
        self.restore_after = restore_after
        self.window = fail_after + restore_after
        self.state: dict[str, dict] = {}
        for name, entry in (saved or {}).items():
            # State saved before the history was kept: a fault stays a fault.
            self.state[name] = {"fault": bool(entry.get("fault")),
                                "history": list(entry.get("history", []))[-self.window:]}

    def update(self, result: CheckResult) -> str | None:
        """Feed one result; returns ``fault`` or ``restore`` when an event is due."""
        entry = self.state.setdefault(result.name, {"fault": False, "history": []})
        history: list = entry["history"]
        history.append(result.ok)
        del history[:-self.window]
        recent = history[-self.restore_after:]
        if entry["fault"]:
            # Passes in a row, an unreadable reading now and then not breaking the row.
            passes = [ok for ok in history if ok is not None][-self.restore_after:]
            settled = len(recent) == self.restore_after
            if (len(passes) == self.restore_after and all(passes)) or \
                    (settled and all(ok is None for ok in recent)):
                entry["fault"] = False
                history.clear()
                return "restore"
            return None
        if sum(ok is False for ok in history) >= self.fail_after or (
                result.ok is False and result.at_once):
            entry["fault"] = True
            history.clear()
            return "fault"
        return None

    def faulted(self, name: str) -> bool:
        return self.state.get(name, {}).get("fault", False)
