"""Read-only probes of the board's health: CPU temperature, power, disk.

Each probe takes ``root`` (``/`` on a device) so that tests can point it at a fake sysfs
tree, and none raises for a source that is missing: a board without the sensor reports
``available=False`` and the reason, and the self-test daemon marks that check "not
applicable" instead of failing it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

# Raspberry Pi firmware `get_throttled` bits (vcgencmd documentation).
UNDER_VOLTAGE_NOW = 1 << 0
CAPPED_NOW = 1 << 1
THROTTLED_NOW = 1 << 2
SOFT_TEMP_LIMIT_NOW = 1 << 3
UNDER_VOLTAGE_OCCURRED = 1 << 16
CAPPED_OCCURRED = 1 << 17
THROTTLED_OCCURRED = 1 << 18
SOFT_TEMP_LIMIT_OCCURRED = 1 << 19


@dataclass(frozen=True)
class Reading:
    available: bool
    celsius: float | None = None
    source: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class PowerStatus:
    available: bool
    under_voltage_now: bool = False
    throttled_now: bool = False
    capped_now: bool = False
    soft_temp_limit_now: bool = False
    under_voltage_since_boot: bool = False
    throttled_since_boot: bool = False
    raw: int | None = None
    source: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class DiskSpace:
    path: str
    free_bytes: int    # for unprivileged users (f_bavail): what the daemons can use
    total_bytes: int   # root's reserved blocks are part of the total, never of free_bytes


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def cpu_temperature(root: Path = Path("/")) -> Reading:
    """The CPU's thermal zone (``cpu-thermal`` on a Pi; else the first zone)."""
    zones = sorted((root / "sys/class/thermal").glob("thermal_zone*"))
    if not zones:
        return Reading(False, reason="no thermal zone reported by the kernel")
    chosen = next((z for z in zones if _read(z / "type") == "cpu-thermal"), zones[0])
    raw = _read(chosen / "temp")
    try:
        return Reading(True, int(raw) / 1000, source=str(chosen / "temp"))
    except (TypeError, ValueError):
        return Reading(False, source=str(chosen / "temp"),
                       reason=f"unreadable temperature {raw!r}")


def _decode(raw: int, source: str) -> PowerStatus:
    return PowerStatus(
        True, under_voltage_now=bool(raw & UNDER_VOLTAGE_NOW),
        throttled_now=bool(raw & THROTTLED_NOW), capped_now=bool(raw & CAPPED_NOW),
        soft_temp_limit_now=bool(raw & SOFT_TEMP_LIMIT_NOW),
        under_voltage_since_boot=bool(raw & UNDER_VOLTAGE_OCCURRED),
        throttled_since_boot=bool(raw & THROTTLED_OCCURRED), raw=raw, source=source)


def power_status(root: Path = Path("/"), vcgencmd: str | None = None) -> PowerStatus:
    """Under-voltage and throttling: the firmware's ``get_throttled`` (in sysfs, else from
    ``vcgencmd get_throttled``) for every flag, and the ``rpi_volt`` hwmon alarm of current
    kernels for under-voltage now, which it reports the moment it happens."""
    reasons: list[str] = []
    throttled = _firmware_throttled(root, vcgencmd, reasons)
    volt = _rpi_volt_alarm(root, reasons)
    if volt is not None:
        alarm, source = volt
        if throttled is None:
            # Throttling is unknown here, not absent: the reason says so.
            return PowerStatus(True, under_voltage_now=alarm, source=source,
                               reason="; ".join(reasons) or None)
        return replace(throttled, under_voltage_now=alarm or throttled.under_voltage_now,
                       source=f"{source} + {throttled.source}")
    if throttled is not None:
        return throttled
    reasons.insert(0, "the board reports no under-voltage or throttling state")
    return PowerStatus(False, reason="; ".join(reasons))


def _rpi_volt_alarm(root: Path, reasons: list[str]) -> tuple[bool, str] | None:
    for hwmon in sorted((root / "sys/class/hwmon").glob("hwmon*")):
        if _read(hwmon / "name") == "rpi_volt":
            path = hwmon / "in0_lcrit_alarm"
            alarm = _read(path)
            if alarm in ("0", "1"):
                return alarm == "1", str(path)
            reasons.append(f"{path}: unreadable alarm {alarm!r}")
    return None


def _firmware_throttled(root: Path, vcgencmd: str | None,
                        reasons: list[str]) -> PowerStatus | None:
    firmware = root / "sys/devices/platform/soc/soc:firmware/get_throttled"
    text = _read(firmware)
    if text is not None:
        try:
            # The kernel writes hex without "0x"; tolerate it with one.
            return _decode(int(text.removeprefix("0x"), 16), str(firmware))
        except ValueError:
            reasons.append(f"{firmware}: unreadable value {text!r}")
    command = vcgencmd or shutil.which("vcgencmd")
    if not command or not os.access(command, os.X_OK):
        return None
    try:
        run = subprocess.run([command, "get_throttled"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired) as err:
        reasons.append(f"vcgencmd get_throttled: {err}")
        return None
    key, _, value = run.stdout.strip().partition("=")
    try:
        if run.returncode != 0 or key != "throttled":
            raise ValueError
        return _decode(int(value, 16), "vcgencmd get_throttled")
    except ValueError:
        said = (run.stderr or run.stdout).strip() or f"exit status {run.returncode}"
        reasons.append(f"vcgencmd get_throttled failed: {said}")
        return None


def disk_space(path: Path) -> DiskSpace:
    """Free space of the filesystem holding ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    stat = os.statvfs(path)
    return DiskSpace(str(path), stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize)


def board_model(root: Path = Path("/")) -> str | None:
    try:
        return (root / "proc/device-tree/model").read_bytes().rstrip(b"\0").decode()
    except (OSError, UnicodeDecodeError):
        return None
