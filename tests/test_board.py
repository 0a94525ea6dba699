"""The board probes, read from fake sysfs/procfs trees built the way the kernel lays them out.

Each test builds only the files the story needs under ``tmp_path`` and points the probe's
``root`` at it, so the same probes that read ``/`` on a Pi are exercised on any Linux box.
``vcgencmd`` is a real executable script that answers as the firmware tool does and keeps a
log of how it was asked. Where the trees' contents come from: the thermal and hwmon layout
from the kernel's sysfs ABI, ``get_throttled`` from raspberrypi/linux PR #2397 (the kernel
writes the value in hex without ``0x``), and the bit meanings from the Raspberry Pi
``vcgencmd`` documentation.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drivers import board


def thermal_zone(root: Path, index: int, kind: str, temp: str | bytes | None) -> Path:
    """A ``thermal_zoneN`` directory with its ``type`` and (unless None) ``temp``."""
    zone = root / f"sys/class/thermal/thermal_zone{index}"
    zone.mkdir(parents=True)
    (zone / "type").write_text(f"{kind}\n")
    if isinstance(temp, bytes):
        (zone / "temp").write_bytes(temp)
    elif temp is not None:
        (zone / "temp").write_text(temp)
    return zone


def hwmon(root: Path, index: int, name: str, **files: str) -> Path:
    """A ``hwmonN`` device called ``name`` with the given attribute files."""
    device = root / f"sys/class/hwmon/hwmon{index}"
    device.mkdir(parents=True)
    (device / "name").write_text(f"{name}\n")
    for attribute, text in files.items():
        (device / attribute).write_text(text)
    return device


def firmware_throttled(root: Path, text: str) -> Path:
    path = root / "sys/devices/platform/soc/soc:firmware/get_throttled"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def fake_vcgencmd(directory: Path, stdout: str, stderr: str = "", status: int = 0) -> Path:
    """An executable ``vcgencmd`` that prints what the firmware tool would and appends its
    arguments to ``vcgencmd.log`` next to it, so a test can see how it was asked."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "vcgencmd"
    log = directory / "vcgencmd.log"
    script.write_text(
        "#!/bin/sh\n"
        f"echo \"$*\" >> '{log}'\n"
        f"printf '%s' '{stdout}'\n"
        f"printf '%s' '{stderr}' >&2\n"
        f"exit {status}\n")
    script.chmod(0o755)
    return script


def calls(vcgencmd: Path) -> list[str]:
    log = vcgencmd.parent / "vcgencmd.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty filesystem root: a board that reports nothing until a test adds files."""
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def no_vcgencmd(tmp_path: Path) -> Path:
    """A vcgencmd path that does not exist, so a test never reaches the host's own tool
    (on a developer's Pi, PATH would find the real one)."""
    return tmp_path / "absent" / "vcgencmd"


# -- CPU temperature ---------------------------------------------------------------------


def test_a_pi_4_reports_its_cpu_temperature_in_degrees_celsius(root):
    zone = thermal_zone(root, 0, "cpu-thermal", "48686\n")

    reading = board.cpu_temperature(root)

    assert reading == board.Reading(True, 48.686, source=str(zone / "temp"))


def test_the_cpu_zone_is_found_even_when_another_zone_is_listed_first(root):
    thermal_zone(root, 0, "gpu-thermal", "39000\n")
    cpu = thermal_zone(root, 1, "cpu-thermal", "61250\n")
    thermal_zone(root, 2, "rp1_adc", "30000\n")

    reading = board.cpu_temperature(root)

    assert reading.available
    assert reading.celsius == 61.25
    assert reading.source == str(cpu / "temp")


def test_a_board_without_a_cpu_thermal_zone_reports_its_first_zone(root):
    first = thermal_zone(root, 0, "acpitz", "27800\n")
    thermal_zone(root, 1, "x86_pkg_temp", "45000\n")

    reading = board.cpu_temperature(root)

    assert (reading.celsius, reading.source) == (27.8, str(first / "temp"))


def test_a_temperature_below_freezing_is_a_reading_not_an_error(root):
    # An outdoor gate terminal in a northern winter: sysfs writes negative millidegrees.
    thermal_zone(root, 0, "cpu-thermal", "-12500\n")

    assert board.cpu_temperature(root).celsius == -12.5


@pytest.mark.parametrize("contents", ["banana\n", "", "48.6\n", b"\xff\xfe\x00"],
                         ids=["text", "empty", "not-millidegrees", "not-utf8"])
def test_a_garbled_temperature_is_unavailable_with_a_reason_not_an_exception(root, contents):
    zone = thermal_zone(root, 0, "cpu-thermal", contents)

    reading = board.cpu_temperature(root)

    assert not reading.available
    assert reading.celsius is None
    assert reading.source == str(zone / "temp")
    assert "unreadable" in reading.reason


def test_a_zone_without_a_temp_file_is_unavailable_with_a_reason(root):
    thermal_zone(root, 0, "cpu-thermal", None)

    reading = board.cpu_temperature(root)

    assert not reading.available
    assert reading.reason


@pytest.mark.parametrize("thermal_dir_exists", [False, True])
def test_a_machine_without_thermal_zones_says_so(root, thermal_dir_exists):
    # A container or VM: /sys/class/thermal is missing, or present and empty.
    if thermal_dir_exists:
        (root / "sys/class/thermal").mkdir(parents=True)

    reading = board.cpu_temperature(root)

    assert not reading.available
    assert reading.celsius is None
    assert "no thermal zone" in reading.reason


# -- power: under-voltage and throttling ---------------------------------------------------


@pytest.mark.parametrize("alarm, under_voltage", [("0\n", False), ("1\n", True)])
def test_the_rpi_volt_alarm_is_found_among_other_hwmon_devices(root, no_vcgencmd, alarm,
                                                              under_voltage):
    hwmon(root, 0, "cpu_thermal", temp1_input="51000\n")
    volt = hwmon(root, 1, "rpi_volt", in0_lcrit_alarm=alarm)
    hwmon(root, 2, "pwmfan", pwm1="0\n")

    power = board.power_status(root, vcgencmd=str(no_vcgencmd))

    assert power.available
    assert power.under_voltage_now is under_voltage
    assert power.source == str(volt / "in0_lcrit_alarm")


def test_the_rpi_volt_alarm_and_the_firmware_flags_are_combined(root, no_vcgencmd):
    # The hwmon alarm is the kernel's live under-voltage; the firmware adds throttling and
    # what happened since boot. Either one's under-voltage is under-voltage.
    volt = hwmon(root, 0, "rpi_volt", in0_lcrit_alarm="1\n")
    firmware = firmware_throttled(root, "40000\n")  # throttled earlier, nothing now

    power = board.power_status(root, vcgencmd=str(no_vcgencmd))

    assert power.under_voltage_now and not power.throttled_now
    assert power.throttled_since_boot
    assert power.raw == 0x40000
    assert power.source == f"{volt / 'in0_lcrit_alarm'} + {firmware}"


def test_rpi_volt_alone_says_that_throttling_is_unknown(root, no_vcgencmd):
    hwmon(root, 0, "rpi_volt", in0_lcrit_alarm="0\n")

    power = board.power_status(root, vcgencmd=str(no_vcgencmd))

    assert power.available and not power.under_voltage_now
    assert power.raw is None  # throttling unknown, not "not throttled"


def test_a_garbled_firmware_file_is_named_in_the_reason(root, no_vcgencmd):
    path = firmware_throttled(root, "garbage\n")

    power = board.power_status(root, vcgencmd=str(no_vcgencmd))

    assert not power.available
    assert str(path) in power.reason and "garbage" in power.reason


@pytest.mark.parametrize("text", ["50005\n", "0x50005\n"], ids=["kernel-hex", "0x-prefixed"])
def test_a_weak_supply_in_the_firmware_file_is_under_voltage_and_throttling(root, no_vcgencmd,
                                                                           text):
    # 0x50005: bits 0 and 2 (under-voltage, throttled now), 16 and 18 (both since boot).
    path = firmware_throttled(root, text)

    power = board.power_status(root, vcgencmd=str(no_vcgencmd))

    assert power == board.PowerStatus(
        True, under_voltage_now=True, throttled_now=True, capped_now=False,
        soft_temp_limit_now=False, under_voltage_since_boot=True, throttled_since_boot=True,
        raw=0x50005, source=str(path))


def test_a_hot_board_is_capped_and_at_its_soft_limit_without_under_voltage(root, no_vcgencmd):
    # 0x8000a: bits 1 and 3 now (frequency capped, soft temperature limit), 19 since boot.
    firmware_throttled(root, "8000a\n")

    power = board.power_status(root, vcgencmd=str(no_vcgencmd))

    assert (power.capped_now, power.soft_temp_limit_now) == (True, True)
    assert (power.under_voltage_now, power.throttled_now) == (False, False)
    assert (power.under_voltage_since_boot, power.throttled_since_boot) == (False, False)
    assert power.raw == 0x8000A


FIELD_OF_BIT = {
    0: "under_voltage_now", 1: "capped_now", 2: "throttled_now", 3: "soft_temp_limit_now",
    16: "under_voltage_since_boot", 17: None, 18: "throttled_since_boot", 19: None,
}  # 17 and 19 (capping, soft limit since boot) have no field of their own: only in raw


@pytest.mark.parametrize("bit", sorted(FIELD_OF_BIT))
def test_each_documented_bit_raises_its_own_flag_and_no_other(root, no_vcgencmd, bit):
    firmware_throttled(root, f"{1 << bit:x}\n")

    power = board.power_status(root, vcgencmd=str(no_vcgencmd))

    raised = {name for name in FIELD_OF_BIT.values() if name and getattr(power, name)}
    assert raised == ({FIELD_OF_BIT[bit]} if FIELD_OF_BIT[bit] else set())
    assert power.raw == 1 << bit


def test_vcgencmd_is_asked_when_the_kernel_reports_nothing(root, tmp_path):
    vcgencmd = fake_vcgencmd(tmp_path / "bin", "throttled=0x0\n")

    power = board.power_status(root, vcgencmd=str(vcgencmd))

    assert power == board.PowerStatus(True, raw=0, source="vcgencmd get_throttled")
    assert calls(vcgencmd) == ["get_throttled"]


def test_under_voltage_earlier_since_boot_comes_through_vcgencmd(root, tmp_path):
    vcgencmd = fake_vcgencmd(tmp_path / "bin", "throttled=0x50000\n")

    power = board.power_status(root, vcgencmd=str(vcgencmd))

    assert power.available
    assert not power.under_voltage_now and not power.throttled_now
    assert power.under_voltage_since_boot and power.throttled_since_boot


def test_vcgencmd_is_found_on_path_when_no_path_is_given(root, tmp_path, monkeypatch):
    vcgencmd = fake_vcgencmd(tmp_path / "bin", "throttled=0x0\n")
    monkeypatch.setenv("PATH", f"{vcgencmd.parent}{os.pathsep}{os.environ.get('PATH', '')}")

    power = board.power_status(root)

    assert (power.available, power.raw) == (True, 0)
    assert calls(vcgencmd) == ["get_throttled"]


def test_a_vcgencmd_that_cannot_reach_the_firmware_is_no_source(root, tmp_path):
    # Run by a user outside the "video" group, vcgencmd fails on /dev/vcio.
    vcgencmd = fake_vcgencmd(tmp_path / "bin", "", stderr="VCHI initialization failed\n",
                             status=255)

    power = board.power_status(root, vcgencmd=str(vcgencmd))

    assert not power.available
    assert power.raw is None
    assert "VCHI initialization failed" in power.reason


def test_a_board_with_no_power_source_reports_unavailable_and_touches_nothing(root,
                                                                           no_vcgencmd):
    power = board.power_status(root, vcgencmd=str(no_vcgencmd))

    assert not power.available
    assert power.raw is None and power.source is None
    assert power.reason
    assert list(root.iterdir()) == []  # a probe reads; it never creates what it looks for


# -- disk space and board model ------------------------------------------------------------


def test_disk_space_is_that_of_the_filesystem_holding_the_path(tmp_path):
    space = board.disk_space(tmp_path)

    stat = os.statvfs(tmp_path)
    assert space.path == str(tmp_path)
    assert space.total_bytes == stat.f_blocks * stat.f_frsize
    # Free space moves while other processes write; it must be the unprivileged figure,
    # which never exceeds the total.
    assert 0 <= space.free_bytes <= space.total_bytes


def test_disk_space_for_a_directory_not_made_yet_is_its_nearest_existing_parent(tmp_path):
    # The outbox's directory before the first start: the disk it will land on is known.
    space = board.disk_space(tmp_path / "state" / "not" / "yet")

    assert space.path == str(tmp_path)
    assert space.total_bytes == board.disk_space(tmp_path).total_bytes


def test_the_board_model_is_read_without_its_trailing_nul(root):
    model = root / "proc/device-tree/model"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"Raspberry Pi 4 Model B Rev 1.5\x00")

    assert board.board_model(root) == "Raspberry Pi 4 Model B Rev 1.5"


def test_a_machine_without_a_device_tree_has_no_board_model(root):
    assert board.board_model(root) is None


def test_every_probe_answers_on_this_machine_whatever_it_is():
    # Read-only: on a Pi this reads the real board, elsewhere it finds little; neither raises.
    assert isinstance(board.cpu_temperature(), board.Reading)
    assert isinstance(board.power_status(), board.PowerStatus)
    assert isinstance(board.disk_space(Path("/")), board.DiskSpace)
    assert board.board_model() is None or isinstance(board.board_model(), str)
