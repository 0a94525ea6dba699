"""A 4G module simulator on a real pseudo-terminal, for the tests and the demo.

It answers the AT subset Guardpost uses the way a Quectel EC2x or SIMCom SIM7600 does:
echo until ``ATE0``, ``+CME ERROR``/``+CMS ERROR`` with ``AT+CMEE=1``, the SIM's PIN,
network registration, signal, and ``AT+CMGS`` in PDU mode (the ``> `` prompt, the PDU
until Ctrl-Z, whose length must match, ``+CMGS: <mr>``). Each message sent is decoded and
kept. Its state can be changed at any time: no SIM, a PIN, no network, slow or no
answers, send failures, unsolicited result codes.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import tty
from dataclasses import dataclass, field

from drivers.modem.pdu import DecodedSubmit, decode_submit, reassemble

CTRL_Z, ESC = 0x1A, 0x1B


@dataclass
class SimulatedModemState:
    sim: str = "READY"              # READY | SIM PIN | absent
    pin: str | None = None          # the PIN that unlocks it, when sim == "SIM PIN"
    registration: int = 1           # +CREG/+CEREG stat: 1 home, 5 roaming, 2 searching, 0 none
    csq: int = 20
    operator: str = "CHINA MOBILE"
    reply_delay: float = 0.0        # seconds before every answer
    dead: bool = False              # never answers
    fail_sends: int = 0             # the next N AT+CMGS answer +CMS ERROR: send_error
    dead_after_messages: int | None = None  # this many whole messages accepted: dead (hung)
    send_error: int = 38            # network out of order
    refused_numbers: tuple[str, ...] = ()  # every message to these: +CMS ERROR: send_error
    wrong_pins: int = 0
    urc_before_reply: str | None = None  # emitted once, just before the next answer
    hang_up_on: str | None = None   # this command unplugs the module instead of an answer
    garbled: dict[str, str] = field(default_factory=dict)  # command -> the line it answers
    echo: bool = True
    cmee: int = 0


@dataclass
class SentPart:
    length: int
    pdu: DecodedSubmit
    at: float = field(default_factory=time.monotonic)  # when the module accepted it


@dataclass
class ModemSimulator:
    """``with ModemSimulator() as sim:`` — open ``sim.port`` with pyserial."""

    state: SimulatedModemState = field(default_factory=SimulatedModemState)

    def __post_init__(self):
        self.sent: list[SentPart] = []
        self.commands: list[str] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._mr = 0
        self.master, self._slave = os.openpty()
        self._master_open = True
        tty.setraw(self._slave)  # no line discipline: bytes pass as a UART's would
        self.port = os.ttyname(self._slave)
        self._thread = threading.Thread(target=self._serve, name="modem-sim", daemon=True)

    def __enter__(self) -> ModemSimulator:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self._close_master()
        with contextlib.suppress(OSError):
            os.close(self._slave)

    # -- what the test sees --------------------------------------------------------------

    def set(self, **changes) -> None:
        with self._cond:
            for key, value in changes.items():
                setattr(self.state, key, value)

    def messages(self) -> list[tuple[str, str]]:
        """Every complete message as (number, text): concatenated parts reassembled."""
        with self._cond:
            parts = [p.pdu for p in self.sent]
        singles = [(p.number, p.text) for p in parts if p.reference is None]
        groups: dict[tuple, list[DecodedSubmit]] = {}
        for p in parts:
            if p.reference is not None:
                groups.setdefault((p.number, p.reference, p.total), []).append(p)
        whole = [(number, reassemble(group)) for (number, _, total), group in groups.items()
                 if len({g.sequence for g in group}) == total]
        return singles + whole

    def wait_for_messages(self, count: int, timeout: float = 30.0) -> list[tuple[str, str]]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages_locked()) >= count, timeout):
                raise AssertionError(f"timed out waiting for {count} SMS; have "
                                     f"{self._messages_locked()}")
        return self.messages()

    def _messages_locked(self) -> list:
        parts = [p.pdu for p in self.sent]
        singles = sum(1 for p in parts if p.reference is None)
        groups: dict[tuple, set] = {}
        for p in parts:
            if p.reference is not None:
                groups.setdefault((p.number, p.reference, p.total), set()).add(p.sequence)
        return [None] * (singles + sum(1 for (_, _, t), s in groups.items() if len(s) == t))

    def parts_begun(self) -> int:
        """AT+CMGS commands received: the parts begun, accepted or not."""
        with self._cond:
            return sum(c.upper().startswith("AT+CMGS=") for c in self.commands)

    def hang_up(self) -> None:
        """Unplug the module: the port's reads and writes fail with EIO, as a USB modem's
        do when it vanishes, and the device node goes away."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(5)
        self._close_master()

    def _close_master(self) -> None:
        # Once only: a second close could hit a descriptor number reused by someone else.
        with self._cond:
            fd, self._master_open = (self.master if self._master_open else None), False
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def unsolicited(self, line: str) -> None:
        """Emit an unsolicited result code now."""
        self._write(f"\r\n{line}\r\n".encode())

    # -- the module ----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        with self._cond, contextlib.suppress(OSError):
            if self._master_open:
                os.write(self.master, data)

    def _serve(self) -> None:
        buffer = b""
        pending_cmgs: int | None = None
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                return
            buffer += chunk
            while not self._stop.is_set():
                if pending_cmgs is not None:
                    end = min((i for i in (buffer.find(bytes([CTRL_Z])), buffer.find(bytes([ESC])))
                               if i >= 0), default=-1)
                    if end < 0:
                        break
                    body, cancelled = buffer[:end], buffer[end] == ESC
                    buffer = buffer[end + 1:]
                    self._finish_cmgs(pending_cmgs, body.decode("ascii", "replace").strip(),
                                      cancelled)
                    pending_cmgs = None
                    continue
                if b"\r" not in buffer:
                    break
                line, _, buffer = buffer.partition(b"\r")
                buffer = buffer.lstrip(b"\n")
                line = line.replace(bytes([ESC]), b"")  # ignored outside a message's text
                pending_cmgs = self._command(line.decode("ascii", "replace").strip())

    def _reply(self, *lines: str, final: str = "OK") -> None:
        with self._cond:
            delay, dead = self.state.reply_delay, self.state.dead
            urc, self.state.urc_before_reply = self.state.urc_before_reply, None
        if dead:
            return
        if delay:
            self._stop.wait(delay)
        if urc:
            self._write(f"\r\n{urc}\r\n".encode())
        text = "".join(f"\r\n{line}\r\n" for line in lines) + f"\r\n{final}\r\n"
        self._write(text.encode())

    def _error(self, kind: str, code: int) -> None:
        with self._cond:
            verbose = self.state.cmee
        self._reply(final=f"+{kind} ERROR: {code}" if verbose else "ERROR")

    def _command(self, line: str) -> int | None:
        """Answer one command line; returns the announced length after AT+CMGS=."""
        if not line:
            return None
        with self._cond:
            self.commands.append(line)
            s = self.state
            unplug = s.hang_up_on is not None and line.upper() == s.hang_up_on.upper()
        if unplug:
            self.hang_up()
            return None
        with self._cond:
            if s.echo and not s.dead:
                self._write(line.encode() + b"\r")
        upper = line.upper()
        if upper in s.garbled:
            self._reply(s.garbled[upper])
        elif upper == "AT":
            self._reply()
        elif upper in ("ATE0", "ATE1"):
            self.set(echo=upper == "ATE1")
            self._reply()
        elif upper.startswith("AT+CMEE="):
            self.set(cmee=int(upper.split("=")[1]))
            self._reply()
        elif upper in ("AT+CMGF=0", "AT+CMGF=1"):
            self._reply()
        elif upper == "AT+CPIN?":
            if s.sim == "absent":
                self._error("CME", 10)
            else:
                self._reply(f"+CPIN: {s.sim}")
        elif upper.startswith("AT+CPIN="):
            self._enter_pin(line.split("=", 1)[1].strip('"'))
        elif upper in ("AT+CREG?", "AT+CEREG?"):
            if s.sim != "READY":
                self._error("CME", 10 if s.sim == "absent" else 11)
            else:
                self._reply(f"{upper[2:-1]}: 0,{s.registration}")
        elif upper == "AT+CSQ":
            self._reply(f"+CSQ: {s.csq},99")
        elif upper == "AT+COPS?":
            registered = s.registration in (1, 5)
            self._reply(f'+COPS: 0,0,"{s.operator}",7' if registered else "+COPS: 0")
        elif upper == "AT+CGMI":
            self._reply("Quectel")
        elif upper == "AT+CGMM":
            self._reply("EC25")
        elif upper == "AT+CGSN":
            self._reply("867698041234567")
        elif upper.startswith("AT+CMGS="):
            return self._start_cmgs(int(upper.split("=")[1]))
        else:
            self._reply(final="ERROR")
        return None

    def _enter_pin(self, pin: str) -> None:
        with self._cond:
            s = self.state
            if s.sim != "SIM PIN":
                self._error("CME", 3)
                return
            if pin == s.pin:
                s.sim = "READY"
            else:
                s.wrong_pins += 1
                if s.wrong_pins >= 3:
                    s.sim = "SIM PUK"
        if s.sim == "READY":
            self._reply()
        else:
            self._error("CME", 16)

    def _start_cmgs(self, length: int) -> int | None:
        with self._cond:
            s = self.state
            if s.dead:
                return None
            if s.sim != "READY":
                self._error("CMS", 310)  # instead of the prompt
                return None
            urc, s.urc_before_reply = s.urc_before_reply, None
        if urc:  # a code the module had to say may come before the prompt, too
            self._write(f"\r\n{urc}\r\n".encode())
        self._write(b"\r\n> ")
        return length

    def _finish_cmgs(self, length: int, pdu_hex: str, cancelled: bool) -> None:
        if cancelled:
            self._reply()
            return
        try:
            pdu = decode_submit(pdu_hex)
        except (ValueError, IndexError):
            self._error("CMS", 304)
            return
        if pdu.tpdu_length != length:
            self._error("CMS", 304)  # invalid PDU mode parameter: the length is wrong
            return
        with self._cond:
            s = self.state
            if s.registration not in (1, 5):
                failure = 331  # no network service
            elif s.fail_sends > 0:
                s.fail_sends -= 1
                failure = s.send_error
            elif pdu.number in s.refused_numbers:
                failure = s.send_error
            else:
                failure = None
                self._mr = (self._mr + 1) % 256
                self.sent.append(SentPart(length, pdu))
                reference = self._mr
                if (s.dead_after_messages is not None
                        and len(self._messages_locked()) >= s.dead_after_messages):
                    s.dead_after_messages, hang = None, True
                else:
                    hang = False
                self._cond.notify_all()
        if failure is not None:
            self._error("CMS", failure)
        else:
            self._reply(f"+CMGS: {reference}")
            if hang:  # it answered this part, and nothing after it
                self.set(dead=True)
