"""The fallback daemon's 4G modem: its serial port, the SIM PIN, its status, one SMS.

The port is opened (and the module initialised) when first needed and closed after any
failure, to be opened afresh next time. A PIN the SIM refused is remembered and never
offered again: a third wrong PIN locks the SIM with its PUK. Nothing here raises to the
daemon for a modem that misbehaves: a send is ``sent``, ``refused`` (the network said no
to this message) or ``unable`` (the modem cannot send at all).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable
from datetime import datetime

from drivers.modem import Modem, ModemError, SmsRefused
from edge.config import Config
from edge.contract.events import ContactId, utc_iso
from edge.store.rows import EventRow

log = logging.getLogger(__name__)

WHAT = {ContactId.PANIC: "紧急报警", ContactId.SILENT_PANIC: "无声报警",
        ContactId.AUDIBLE_PANIC: "紧急报警"}


class ModemPort:
    """Owns the modem for the fallback daemon (two readers of one AT port would take
    each other's answers)."""

    def __init__(self, config: Config, clock: Callable[[], datetime],
                 heartbeat: Callable[[], None], changed: Callable[[], None],
                 open_modem: Callable[[], Modem] | None = None):
        self.config = config
        self._clock = clock
        self._heartbeat = heartbeat    # after every exchange: a long send is not a hang
        self._changed = changed        # the state worth saving changed (a refused PIN)
        self._open_modem = open_modem or self._open_serial
        self.modem: Modem | None = None
        self.status: dict = {"present": False, "error": "not opened yet"}
        self.pin_rejected: str | None = None  # hash of the PIN the SIM refused
        self.status_reads = 0
        self.checked_at: str | None = None    # the last status reading

    def _open_serial(self) -> Modem:
        m = self.config.modem
        return Modem.open_port(str(m.port), baudrate=m.baudrate,
                               command_timeout=m.command_timeout_s, sms_timeout=m.sms_timeout_s,
                               heartbeat=self._heartbeat)

    def _opened(self) -> Modem:
        if self.modem is None:
            modem = self._open_modem()
            try:
                self._unlock(modem)
            except BaseException:
                modem.close()
                raise
            self.modem = modem
        return self.modem

    def _unlock(self, modem: Modem) -> None:
        """Enter the SIM PIN once; a PIN the SIM refused is never offered again."""
        pin = self.config.modem.pin
        if modem.sim_state().state != "SIM PIN" or pin is None:
            return
        digest = hashlib.sha256(pin.encode()).hexdigest()[:16]
        if self.pin_rejected == digest:
            raise ModemError("AT+CPIN", "SIM PIN already rejected once: not retrying (a "
                             "third wrong PIN locks the SIM); fix modem.pin")
        try:
            modem.enter_pin(pin)
        except ModemError:
            # On disk now, wherever the PIN went in (a status read or a send): a restart
            # before the next status read must not offer it again.
            self.pin_rejected = digest
            self._changed()
            raise

    def close(self) -> None:
        if self.modem is not None:
            with contextlib.suppress(Exception):
                self.modem.close()
            self.modem = None

    def read_status(self) -> None:
        """Presence, SIM, registration and signal, for `status` and the self-test."""
        try:
            self.status = self._opened().status().as_dict()
        except (ModemError, OSError) as err:
            self.close()
            self.status = {"present": False, "error": str(err)}
        self.status_reads += 1
        self.checked_at = utc_iso(self._clock())

    def send(self, number: str, text: str) -> dict:
        """One SMS to one number: ``{"state": "sent" | "refused" | "unable", ...}``."""
        at = utc_iso(self._clock())
        try:
            result = self._opened().send_sms(number, text)
        except SmsRefused as err:
            log.error("SMS to %s refused: %s", number, err)
            return {"state": "refused", "error": str(err), "at": at}
        except (ModemError, OSError) as err:
            log.error("SMS to %s not sent, the modem cannot send: %s", number, err)
            self.close()  # reopened (and re-initialised) for the next attempt
            return {"state": "unable", "error": str(err), "at": at}
        log.warning("alarm SMS sent to %s (%d part(s), references %s)", number,
                    len(result.references), result.references)
        return {"state": "sent", "references": list(result.references), "parts":
                len(result.references), "at": at}


def sms_text(config: Config, first: EventRow, code: int, count: int) -> str:
    """The message, from the configured template, for ``count`` alarms, the first one's
    details filled in."""
    zone = config.device.zone
    spec = config.inputs.get(first.input or "")
    fields = {
        "site": config.device.site_id, "device": config.device.device_id,
        "location": config.device.location,
        "time": datetime.fromisoformat(first.occurred_at).astimezone(zone)
        .strftime("%Y-%m-%d %H:%M:%S"),
        "input": first.input or "",
        "label": spec.label if spec and spec.label else first.input or "",
        "what": WHAT.get(code, "报警"), "code": str(code), "event_id": first.id,
        "timeout": f"{config.fallback.ack_timeout_s:g}", "count": str(count),
    }
    return config.fallback.template.format_map(fields)
