"""``guardpost run all``: the button is never down for long, and nothing outlives it.
Real processes, a real broker, the supervisor's own log."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from edge.daemons.supervisor import BUTTON_RESTART_MAX_S
from edge.runtime.sdnotify import NotifyListener
from tests.support.daemons import DaemonProcess, poll_until
from tests.test_alarm_path import online, press


def started(process: DaemonProcess, name: str, after: int = 0) -> tuple[int, int]:
    """The log line where ``run all`` started ``name``, and the child's pid."""
    index = process.wait_for_line(f"started {name} (pid", after=after)
    return index, int(process.lines[index].split("pid ")[1].rstrip(")"))


def gone(pid: int) -> bool:
    """Dead (a zombie waiting for a reaper is dead too)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def run_all(path: Path, tmp_path: Path, name: str) -> tuple[DaemonProcess, NotifyListener]:
    listener = NotifyListener(tmp_path / f"{name}.notify")
    return DaemonProcess("all", path, listener).start(), listener


def test_run_all_starts_the_button_again_at_once_however_often_it_dies(make_config, tmp_path):
    """Issue 11, class 2: the supervisor's restart backoff (0.5 s doubling to 30 s) left
    the button unarmed for up to 18 s after a few crashes. While it is down no press is
    read: it is restarted at once, and never more than a second later, however often."""
    path, config = make_config()
    everything, listener = run_all(path, tmp_path, "all")
    try:
        after = 0
        for _crash in range(5):
            index, pid = started(everything, "button", after)
            ready = everything.wait_for_line("button is ready", after=index)
            os.kill(pid, signal.SIGKILL)
            line = everything.wait_for_line("button exited with code -9", after=ready)
            delay = float(everything.lines[line].split("restarting in ")[1].split(" s")[0])
            assert delay <= BUTTON_RESTART_MAX_S, everything.lines[line]
            after = line
        everything.wait_for_line("button is ready", after=after)
        press(config)
    finally:
        assert everything.stop() == 0
        listener.close()


def test_run_all_killed_with_9_takes_its_daemons_along_and_starts_again_cleanly(
        make_config, platform, tmp_path):
    """Issue 11, class 10: `run all` killed with -9 left its daemons running as orphans
    (no will, no offline status), and a new `run all` then restart-looped on "another
    daemon is running". Its children now stop with it (cleanly: the uplink says offline),
    and the next `run all` starts as if nothing had happened."""
    path, config = make_config()
    police = platform(config)
    first, listener = run_all(path, tmp_path, "first")
    birth = online(police)[0]
    children = [started(first, name)[1] for name in ("button", "uplink", "selftest")]
    first.kill()
    listener.close()
    for pid in children:
        poll_until(lambda pid=pid: gone(pid), what=f"child {pid} to stop with the supervisor")
    police.wait_for(lambda p: [s for s in p.on("status") if s["state"] == "offline"
                               and s["session"] == birth["session"]],
                    what="the device to say it went offline")
    second, listener = run_all(path, tmp_path, "second")
    try:
        online(police, session=birth["session"] + 1)
        event = press(config)
        police.wait_for(lambda p: [e for e in p.events() if e["id"] == event["id"]],
                        what="an alarm through the new run all")
        assert "not starting a second one" not in second.log()
    finally:
        assert second.stop() == 0
        listener.close()


def test_a_second_run_all_for_the_same_device_refuses_to_start(make_config, tmp_path):
    path, _ = make_config()
    first, listener = run_all(path, tmp_path, "first")
    try:
        second = DaemonProcess("all", path, listener)
        second.start(wait_ready=False)
        assert second.process.wait(60) == 1
        assert "`run all` is already running for this device" in second.log()
    finally:
        assert first.stop() == 0
        listener.close()
