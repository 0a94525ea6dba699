"""Facts about time that every event records.

A Raspberry Pi has no real-time clock: until NTP has synchronised after boot, the wall
clock may be far off. Each event therefore says whether the kernel considered the
clock synchronised when it was stamped, and which boot it came from, so the platform
can correct or flag the time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

_TIME_ERROR = 5  # adjtimex(2): clock not synchronised (STA_UNSYNC set)
_TIMEX_SIZE = 512  # larger than struct timex on every Linux ABI; only `modes` is read


@functools.cache
def _adjtimex():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    func = libc.adjtimex
    func.argtypes = [ctypes.c_void_p]
    func.restype = ctypes.c_int
    return func


def clock_synchronised() -> bool:
    """True when the kernel's clock discipline reports synchronised time.

    This is what ``timedatectl``'s "System clock synchronized" reads, and it works for
    systemd-timesyncd, chrony and ntpd alike. A read-only call (modes = 0) needs no
    privilege.
    """
    try:
        buffer = ctypes.create_string_buffer(_TIMEX_SIZE)
        state = _adjtimex()(buffer)
    except (OSError, AttributeError) as err:  # not Linux, or no libc symbol
        _warn_once(f"adjtimex unavailable ({err}): events say clock_synced=false")
        return False
    if state == -1:
        # A seccomp filter (systemd's SystemCallFilter=) or an odd kernel: say so once
        # rather than stamp every event "not synchronised" in silence.
        _warn_once(f"adjtimex failed ({os.strerror(ctypes.get_errno())}): events say "
                   "clock_synced=false")
        return False
    return state != _TIME_ERROR


@functools.cache
def _warn_once(message: str) -> None:
    log.warning("%s", message)


@functools.cache
def boot_id() -> str:
    """The kernel's random id of this boot (changes at every power cycle)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"
