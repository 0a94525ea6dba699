"""The 4G module: SIM, registration, signal, and SMS in PDU mode.

Written for the AT command set the common modules share (TS 27.007 / 27.005): Quectel
EC2x/EG25-G and SIMCom SIM7600. It uses only standard commands (no vendor extension),
so other modules with a standard AT port should work too. Verified here against the
behavioural simulator of the tests (``tests/support/modem_sim.py``) on a real
pseudo-terminal, not against a module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import serial

from drivers.modem.at import FINAL_ERROR, AtChannel, ModemError, ModemTimeout, UnreadableAnswer
from drivers.modem.pdu import encode_submit

log = logging.getLogger(__name__)

# AT+CREG / AT+CEREG <stat> (TS 27.007 §7.2).
REGISTRATION = {0: "not registered", 1: "home", 2: "searching", 3: "denied", 4: "unknown",
                5: "roaming"}
REGISTERED = ("home", "roaming")

# Error codes after which nothing was offered to the network: the module cannot send at
# all (no SIM or a locked one, no network, no service centre), whatever the message.
CANNOT_SEND = ({("CMS", c) for c in (300, 301, 302, 310, 311, 312, 313, 314, 315, 316, 317,
                                     318, 320, 321, 322, 330, 331)}
               | {("CME", c) for c in (3, 4, 10, 11, 12, 13, 14, 15, 16, 17, 18, 30)})


class SmsRefused(ModemError):
    """The module tried this message and the network (or the module) refused it: unlike
    a module that cannot send at all (no SIM, no network, unplugged, silent), which
    raises a plain :class:`ModemError`."""


def _refused(err: ModemError) -> bool:
    """An error answer (not a timeout, not a failed port) that is not one of the module
    being unable to send."""
    answered = err.kind is not None or err.answer in FINAL_ERROR
    return (answered and not isinstance(err, ModemTimeout)
            and (err.kind, err.code) not in CANNOT_SEND)


def _integer(command: str, value: str, field: str) -> int:
    try:
        return int(field)
    except ValueError:
        raise UnreadableAnswer(command, value) from None


@dataclass(frozen=True)
class SimState:
    state: str  # READY, SIM PIN, SIM PUK, not inserted, failure, ...

    @property
    def ready(self) -> bool:
        return self.state == "READY"


@dataclass(frozen=True)
class Signal:
    csq: int | None       # 0..31, None when the module does not know (99)
    dbm: int | None       # -113 + 2 x csq
    ber: int | None


@dataclass(frozen=True)
class SmsResult:
    number: str
    references: list[int]  # the network's message reference of each part (+CMGS: <mr>)
    parts: int


@dataclass
class ModemStatus:
    present: bool
    sim: str | None = None
    registration: str | None = None
    signal_csq: int | None = None
    signal_dbm: int | None = None
    operator: str | None = None
    model: str | None = None
    error: str | None = None
    problems: list[str] = field(default_factory=list)  # what makes the SMS path unusable

    def as_dict(self) -> dict:
        return asdict(self)


class Modem:
    """One module on one serial port; not thread-safe (its owner is one daemon thread)."""

    def __init__(self, port, *, command_timeout: float = 5.0, sms_timeout: float = 60.0,
                 heartbeat: Callable[[], None] | None = None):
        self.channel = AtChannel(port, timeout=command_timeout, heartbeat=heartbeat)
        self.sms_timeout = sms_timeout
        self._port = port
        self._initialised = False

    @classmethod
    def open_port(cls, path: str, *, baudrate: int = 115200, command_timeout: float = 5.0,
                  sms_timeout: float = 60.0,
                  heartbeat: Callable[[], None] | None = None) -> Modem:
        """Open the serial port and initialise the module; raises :class:`ModemError`.
        ``heartbeat`` is called after every exchange with the module (see AtChannel)."""
        try:
            port = serial.Serial(path, baudrate=baudrate, timeout=0.5, write_timeout=5)
        except (serial.SerialException, OSError) as err:
            raise ModemError("open", f"cannot open {path}: {err}") from None
        modem = cls(port, command_timeout=command_timeout, sms_timeout=sms_timeout,
                    heartbeat=heartbeat)
        try:
            modem.initialise()
        except BaseException:
            modem.close()
            raise
        return modem

    def close(self) -> None:
        self._port.close()

    def __enter__(self) -> Modem:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def initialise(self) -> None:
        """Echo off, numeric errors, PDU mode. The module may still be waiting for the
        text of a message we never finished: that is abandoned first. The first ``AT``
        may meet a module still echoing or mid-boot: it is tried a few times."""
        self.channel.abandon_message()
        last: ModemError | None = None
        for _ in range(3):
            try:
                self.channel.command("AT")
                break
            except ModemError as err:
                last = err
        else:
            raise last
        self.channel.command("ATE0")
        self.channel.command("AT+CMEE=1")
        self.channel.command("AT+CMGF=0")
        self._initialised = True

    # -- state ---------------------------------------------------------------------------

    def sim_state(self) -> SimState:
        try:
            value = self.channel.command("AT+CPIN?").value("+CPIN:")
        except ModemError as err:
            if err.code == 10:
                return SimState("not inserted")
            if err.code in (13, 15):
                return SimState("failure")
            raise
        return SimState(value or "unknown")

    def enter_pin(self, pin: str) -> None:
        """Raises :class:`ModemError` (CME 16, incorrect password) for a wrong PIN."""
        self.channel.command(f"AT+CPIN={pin}")

    def registration(self) -> str:
        """Registered on the network (``home`` or ``roaming``), by the LTE registration
        (AT+CEREG) or, failing that, the circuit-switched one (AT+CREG), which is what
        SMS over the older networks uses."""
        states = []
        for command, prefix in (("AT+CEREG?", "+CEREG:"), ("AT+CREG?", "+CREG:")):
            try:
                value = self.channel.command(command).value(prefix)
            except (ModemTimeout, UnreadableAnswer):
                raise  # a module that is silent or garbled is not "not registered"
            except ModemError:
                continue  # a module without this command (AT+CEREG on a 3G module)
            if value:
                fields = value.split(",")
                stat = _integer(command, value, fields[1] if len(fields) > 1 else fields[0])
                states.append(REGISTRATION.get(stat, "unknown"))
        registered = [s for s in states if s in REGISTERED]
        return registered[0] if registered else (states[0] if states else "unknown")

    def signal(self) -> Signal:
        value = self.channel.command("AT+CSQ").value("+CSQ:") or "99,99"
        rssi, _, ber = value.partition(",")
        csq = _integer("AT+CSQ", value, rssi)
        known = csq != 99 and 0 <= csq <= 31
        return Signal(csq if known else None, -113 + 2 * csq if known else None,
                      int(ber) if ber.strip().isdigit() and int(ber) != 99 else None)

    def operator(self) -> str | None:
        value = self.channel.command("AT+COPS?").value("+COPS:")
        if value and value.count(",") >= 2:
            return value.split(",")[2].strip('"')
        return None

    def model(self) -> str | None:
        try:
            lines = self.channel.command("AT+CGMM").lines
        except ModemTimeout:
            raise  # silent: not a module without the command
        except ModemError:
            return None
        return lines[0] if lines else None

    def status(self) -> ModemStatus:
        """Everything ``guardpost status`` shows; ``problems`` lists what stops an SMS."""
        sim = self.sim_state()
        status = ModemStatus(present=True, sim=sim.state, model=self.model())
        if not sim.ready:
            status.problems.append(f"SIM {sim.state}")
            return status
        status.registration = self.registration()
        signal = self.signal()
        status.signal_csq, status.signal_dbm = signal.csq, signal.dbm
        if status.registration not in REGISTERED:
            status.problems.append(f"not registered on the network ({status.registration})")
        else:
            status.operator = self.operator()
        return status

    # -- SMS -----------------------------------------------------------------------------

    def send_sms(self, number: str, text: str) -> SmsResult:
        """Send every part with AT+CMGS; raises :class:`ModemError` naming the part that
        failed (the parts before it have gone: the phone shows them once the rest come)."""
        parts = encode_submit(number, text)
        references = []
        for index, part in enumerate(parts, start=1):
            try:
                answer = self.channel.command(f"AT+CMGS={part.tpdu_length}", self.sms_timeout,
                                              data=part.hex.encode("ascii"))
            except ModemError as err:
                failure = (SmsRefused(err.command, err.answer, err.code, err.kind)
                           if _refused(err) else err)
                if len(parts) > 1:
                    failure.args = (f"part {index} of {len(parts)}: {failure}",)
                if failure is err:
                    raise
                raise failure from err
            reference = answer.value("+CMGS:")
            references.append(int(reference) if reference and reference.isdigit() else -1)
        return SmsResult(number, references, len(parts))
