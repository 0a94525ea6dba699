"""An AT command channel over a serial port (pyserial).

One command at a time: write it with a carriage return, read lines until a final result
code. What the module says in between is the answer; unsolicited result codes (``RING``,
``+CMTI``, ``+CREG: 1`` …) may arrive at any moment and are set aside, not mistaken for an
answer. ``AT+CMGS`` is the one command with a second step: the module prompts ``"> "`` (no
line end), then takes the PDU ended by Ctrl-Z.
"""

from __future__ import annotations

import logging
import re
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CTRL_Z = b"\x1a"
ESC = b"\x1b"
FINAL_OK = ("OK",)
FINAL_ERROR = ("ERROR", "NO CARRIER", "NO DIALTONE", "BUSY", "NO ANSWER")
_CME = re.compile(r"^\+(CME|CMS) ERROR:\s*(.+)$")
# Unsolicited result codes of the modules we target (and of TS 27.007/27.005).
URC_PREFIXES = ("RING", "+CMTI:", "+CMT:", "+CDS:", "+CBM:", "+CREG:", "+CEREG:", "+CGREG:",
                "+CUSD:", "+QIND:", "+CPIN:", "RDY", "+CFUN:", "SMS DONE", "PB DONE",
                "+QUSIM:", "+CGEV:", "+CTZV:", "*ATREADY", "+CIEV:")

# The common codes, so that a log line says what a number means (TS 27.007 §9.2,
# TS 27.005 §3.2.5).
CME_MEANINGS = {
    3: "operation not allowed", 4: "operation not supported", 10: "SIM not inserted",
    11: "SIM PIN required", 12: "SIM PUK required", 13: "SIM failure", 14: "SIM busy",
    15: "SIM wrong", 16: "incorrect password", 30: "no network service",
    31: "network timeout", 100: "unknown",
}
CMS_MEANINGS = {
    38: "network out of order", 41: "temporary failure", 42: "congestion",
    69: "requested facility not implemented", 300: "ME failure", 301: "SMS service reserved",
    302: "operation not allowed", 304: "invalid PDU mode parameter", 310: "SIM not inserted",
    311: "SIM PIN required", 313: "SIM failure", 322: "memory full",
    330: "SMSC address unknown", 331: "no network service", 332: "network timeout",
    500: "unknown error",
}

QUIET_S = 0.2     # after ESC: this long without a byte, the module has finished talking
MAX_DRAIN_S = 2.0  # ... and it may talk no longer than this

# A USB modem that vanishes fails every call on its port: reads and ioctls with OSError
# (pyserial's SerialException is one), the input flush (tcflush) with termios.error,
# which is no OSError.
PORT_ERRORS = (OSError, termios.error)


# Commands that carry a password (the SIM PIN, facility locks): shown without it in
# errors and logs, which end up in the journal, `guardpost status` and the outbox.
_WITH_PASSWORD = ("AT+CPIN=", "AT+CPIN2=", "AT+CPWD=", "AT+CLCK=")


def shown(command: str) -> str:
    """``AT+CPIN=1234`` -> ``AT+CPIN=***``: a command as errors and logs may show it."""
    for prefix in _WITH_PASSWORD:
        if command.upper().startswith(prefix):
            return command[:len(prefix)] + "***"
    return command


class ModemError(Exception):
    """The module answered with an error (or cannot be talked to)."""

    def __init__(self, command: str, answer: str, code: int | None = None,
                 kind: str | None = None):
        command = shown(command)
        self.command, self.answer, self.code, self.kind = command, answer, code, kind
        meaning = ""
        if code is not None:
            meaning = (CME_MEANINGS if kind == "CME" else CMS_MEANINGS).get(code, "")
        super().__init__(f"{command}: {answer}" + (f" ({meaning})" if meaning else ""))


class ModemTimeout(ModemError):
    """No final answer within the command's time."""

    def __init__(self, command: str, seconds: float, partial: list[str], *,
                 waiting_for: str = "answer"):
        super().__init__(command, f"no {waiting_for} within {seconds:g} s"
                         + (f" (got {partial!r})" if partial else ""))


class UnreadableAnswer(ModemError):
    """The module answered something that cannot be read (a garbled line)."""

    def __init__(self, command: str, line: str):
        super().__init__(command, f"unreadable answer {line!r}")


@dataclass
class Answer:
    lines: list[str] = field(default_factory=list)  # information lines, echo removed
    final: str = "OK"

    def value(self, prefix: str) -> str | None:
        """The text after ``prefix`` (e.g. ``+CSQ:``) on the first line that has it."""
        for line in self.lines:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        return None


class AtChannel:
    """Commands and answers over an open pyserial port (or anything with its interface:
    ``write``, ``read``, ``in_waiting``, ``timeout``, ``reset_input_buffer``).

    ``heartbeat``, if given, is called after every exchange with the module, answered or
    not: its owner's proof of life while it waits on the module (the fallback daemon
    pings systemd's watchdog with it)."""

    def __init__(self, port, *, timeout: float = 5.0, heartbeat: Callable[[], None] | None = None):
        self.port = port
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.unsolicited: list[str] = []
        self._buffer = b""
        self._command = ""  # the command in progress, for the errors of the port
        self._owed = False  # a command timed out: the module may still answer it

    # -- the low level ----------------------------------------------------------------

    def _io(self, command: str, call, *args):
        """``call(*args)`` on the port; a port that fails is a :class:`ModemError`, so that
        an unplugged modem is one more modem problem for the caller, not a crash."""
        try:
            return call(*args)
        except PORT_ERRORS as err:
            raise ModemError(command, f"the serial port failed: {err}") from err

    def _fill(self, deadline: float) -> bool:
        """Read what has arrived (waiting at most until ``deadline``); False: nothing."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        chunk = self._io(self._command, self._read, min(remaining, 0.5))
        if chunk:
            self._buffer += chunk
        return bool(chunk)

    def _read(self, timeout: float) -> bytes:
        self.port.timeout = timeout  # pyserial reconfigures the port: it can fail too
        return self.port.read(max(1, self.port.in_waiting))

    def _next_line(self, deadline: float) -> str | None:
        while True:
            if b"\n" in self._buffer:
                line, _, self._buffer = self._buffer.partition(b"\n")
                return line.decode("ascii", "replace").strip()
            if not self._fill(deadline) and time.monotonic() >= deadline:
                return None

    def _await_prompt(self, command: str, deadline: float, seconds: float) -> None:
        """Wait for AT+CMGS's ``"> "`` (no line end). Whole lines may come first: our echo,
        blank separators, unsolicited codes (set aside, as during any command), or the
        error that replaces the prompt (raised with its code)."""
        while True:
            text = self._buffer.lstrip(b"\r\n")
            if text.startswith(b">"):
                self._buffer = text[1:].lstrip(b" ")
                return
            if b"\n" in text:
                line, _, self._buffer = text.partition(b"\n")
                line = line.decode("ascii", "replace").strip()
                if not line or line == command:
                    continue
                self._raise_for(command, line)
                if not line.startswith(URC_PREFIXES):
                    log.warning("%s: %r before the '>' prompt, ignored", command, line)
                self._set_aside(line)
                continue
            if not self._fill(deadline) and time.monotonic() >= deadline:
                # Whatever state it is in (a prompt may still come): abandon the message.
                self._io(command, self.port.write, ESC)
                self._owed = True
                raise ModemTimeout(command, seconds, [], waiting_for="'>' prompt")

    # -- commands ---------------------------------------------------------------------

    def command(self, command: str, timeout: float | None = None, *,
                data: bytes | None = None) -> Answer:
        """Send ``command``; return its answer on ``OK``, raise :class:`ModemError` on an
        error result and :class:`ModemTimeout` if none comes. With ``data`` (AT+CMGS),
        wait for the ``>`` prompt and send it followed by Ctrl-Z."""
        if self._owed:
            self._await_late_answer()
            self._beat()
        try:
            return self._exchange(command, self.timeout if timeout is None else timeout, data)
        finally:
            self._beat()

    def _exchange(self, command: str, seconds: float, data: bytes | None) -> Answer:
        deadline = time.monotonic() + seconds
        self._command = shown(command)  # for the logs of a late answer
        self._buffer = b""
        self._io(command, self.port.reset_input_buffer)
        self._io(command, self.port.write, command.encode("ascii") + b"\r")
        answer = Answer()
        if data is not None:
            self._await_prompt(command, deadline, seconds)
            self._io(command, self.port.write, data + CTRL_Z)
        while True:
            line = self._next_line(deadline)
            if line is None:
                self._owed = True
                raise ModemTimeout(command, seconds, answer.lines)
            if not line or line == command or line.startswith(">"):
                continue  # blank separators, our own echo, a late prompt
            if line in FINAL_OK:
                return answer
            self._raise_for(command, line)
            if line.startswith(URC_PREFIXES) and not self._answers(command, line):
                self._set_aside(line)
                continue
            answer.lines.append(line)

    def abandon_message(self) -> None:
        """End a message text the module may still be waiting for (an AT+CMGS whose
        Ctrl-Z never came: the daemon was killed): ESC cancels it, and a module that is
        not waiting for text ignores it. What the module says to it is read and dropped
        until the line falls quiet."""
        self._command = "ESC"
        self._io("ESC", self.port.write, ESC)
        deadline = time.monotonic() + min(self.timeout, MAX_DRAIN_S)
        while time.monotonic() < deadline:
            # A module answers the cancel at once, over a local UART: a short silence
            # means it has said what it had to.
            if not self._io("ESC", self._read, QUIET_S):
                break
        self._buffer = b""
        self._beat()

    def _await_late_answer(self) -> None:
        """The module answers in order: an answer that comes after its command timed out
        would be read as the answer to the next one (an empty ``OK`` for ``AT+CGMM``, and
        so on down the line). Wait for that final result, for at most one command's time,
        and drop it."""
        self._owed = False
        deadline = time.monotonic() + self.timeout
        while (line := self._next_line(deadline)) is not None:
            if line in FINAL_OK or line in FINAL_ERROR or _CME.match(line):
                log.debug("%s: late final answer %r dropped", self._command, line)
                return
            if line.startswith(URC_PREFIXES):
                self._set_aside(line)
        log.debug("%s: no late answer", self._command)

    def _beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat()

    def _set_aside(self, line: str) -> None:
        self.unsolicited.append(line)
        log.debug("unsolicited: %s", line)

    @staticmethod
    def _answers(command: str, line: str) -> bool:
        """``+CREG: 0,1`` answers ``AT+CREG?``; a bare ``+CREG: 1`` is a URC."""
        name = line.split(":", 1)[0]
        return command.upper().startswith(f"AT{name}")

    @staticmethod
    def _raise_for(command: str, line: str) -> None:
        if line in FINAL_ERROR:
            raise ModemError(command, line)
        match = _CME.match(line)
        if match:
            kind, detail = match.groups()
            code = int(detail) if detail.strip().isdigit() else None
            raise ModemError(command, line, code, kind)
