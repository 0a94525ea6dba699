"""The ``guardpost`` command as a user types it: one process per command, real daemons."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime

from edge.contract.events import utc_now
from edge.runtime.sdnotify import NotifyListener
from edge.store.outbox import Outbox
from tests.support.daemons import DaemonProcess, poll_until
from tests.support.trust import DUTY_DESK
from tests.test_alarm_path import online, press
from tests.test_config import guardpost


def test_the_demo_plays_the_whole_story_and_passes():
    """The README's first command, non-interactive: what a newcomer sees must work."""
    result = subprocess.run([sys.executable, "-m", "edge", "demo", "--auto"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASS: 7 events delivered in order" in result.stdout
    assert "PASSED in" in result.stdout  # the alarm test through the simulated relay
    assert "ignored (glitch of" in result.stdout


def test_sim_press_queue_status_and_reset(device, daemons):
    running = device()
    path, police, button = running.path, running.police, running.button
    daemons("selftest", path)

    pressed = guardpost("sim", "press", "gate", "--hold", "0.05", "-c", str(path))
    assert pressed.returncode == 0 and "new alarm recorded, seq 1" in pressed.stdout
    glitch = guardpost("sim", "press", "gate", "--hold", "0", "-c", str(path))
    assert glitch.returncode == 1 and "ignored (glitch of" in glitch.stdout
    unknown = guardpost("sim", "press", "gate2", "-c", str(path))
    assert unknown.returncode == 1 and "no input 'gate2'" in unknown.stderr
    police.wait_for(lambda p: p.unique_events, what="the alarm")
    button.wait_for_line("status LED: steady")

    queue = json.loads(guardpost("queue", "--json", "-c", str(path)).stdout)
    assert queue["counts"] == {"acknowledged": {"alarm": 1}} and queue["last_seq"] == 1
    status = guardpost("status", "-c", str(path))
    assert status.returncode == 0, status.stdout
    assert "ALARM    gate: latched since" in status.stdout
    assert "LED steady" in status.stdout and "uplink   connected" in status.stdout
    assert "check    button           ok" in status.stdout
    assert "no alarm test yet" in status.stdout and "next scheduled" in status.stdout

    reset = guardpost("reset", "--by", "guard Li", "-c", str(path))
    assert reset.returncode == 0 and "reset gate: alarm" in reset.stdout
    [event] = police.wait_for(lambda p: p.events("reset"), what="the reset")
    assert event["detail"]["by"] == "guard Li" and event["code"] == 465
    button.wait_for_line("status LED: off")
    assert "nothing to reset" in guardpost("reset", "-c", str(path)).stdout

    button.stop()
    status = guardpost("status", "-c", str(path))
    assert status.returncode == 1 and "button   NOT RUNNING" in status.stdout


def test_status_says_stale_rather_than_ok_when_the_uplink_died(make_config, daemons, platform):
    path, config = make_config(uplink={"heartbeat_interval": 1, "reconnect_max": 1})
    police = platform(config)
    uplink = daemons("uplink", path)
    online(police)
    uplink.kill()
    # The uplink's last report was "connected"; three missed reports later it is stale.
    with Outbox(config.storage.database, config.identity) as outbox:
        poll_until(lambda: _report_age(outbox) > 3.2, timeout=20, interval=0.2,
                   what="three missed reports")
    status = guardpost("status", "-c", str(path))
    assert status.returncode == 1
    assert "STALE: last report" in status.stdout


def _report_age(outbox) -> float:
    _, updated = outbox.daemons.all()["uplink"]
    return (utc_now() - datetime.fromisoformat(updated)).total_seconds()


def test_sim_press_without_a_running_button_daemon_says_so(make_config):
    path, _ = make_config()
    result = guardpost("sim", "press", "gate", "-c", str(path))
    assert result.returncode == 69 and "button daemon is not running" in result.stderr


def test_watch_prints_and_acknowledges_like_the_platform(make_config, daemons, open_outbox,
                                                       tmp_path):
    path, config = make_config()
    daemons("button", path)
    daemons("uplink", path)
    unsigned = guardpost("watch", "--ack", "-c", str(path))
    assert unsigned.returncode == 64 and "--ack needs --key and --key-id" in unsigned.stderr
    DUTY_DESK.save(tmp_path / "desk.key")
    watch = subprocess.Popen([sys.executable, "-m", "edge", "watch", "--ack", "--json",
                              "--key", str(tmp_path / "desk.key"), "--key-id",
                              DUTY_DESK.key_id, "--count", "1", "-c", str(path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        # The watcher subscribes with a persistent session; wait for the retained birth.
        first = json.loads(watch.stdout.readline())
        assert first["topic"].endswith("/status") and first["payload"]["state"] == "online"
        event = press(config)
        lines = [json.loads(line) for line in watch.stdout]
        assert watch.wait(30) == 0
    finally:
        watch.kill()
    assert [m["payload"]["id"] for m in lines if "/event/" in m["topic"]] == [event["id"]]
    outbox = open_outbox(config)
    poll_until(lambda: outbox.event_states([event["id"]])[event["id"]] == "acknowledged",
               what="the acknowledgement from guardpost watch")


def test_run_all_starts_every_daemon_and_restarts_one_that_is_killed(make_config, platform,
                                                                     tmp_path):
    path, config = make_config()
    police = platform(config)
    listener = NotifyListener(tmp_path / "all.notify")
    everything = DaemonProcess("all", path, listener)
    try:
        everything.start()  # READY=1 from the supervisor: both children are ready
        birth = online(police)[0]
        uplink_line = everything.wait_for_line("started uplink (pid")
        uplink_pid = int(everything.lines[uplink_line].split("pid ")[1].rstrip(")"))
        os.kill(uplink_pid, signal.SIGKILL)
        everything.wait_for_line("uplink exited with code -9")
        online(police, session=birth["session"] + 1)
        press(config)
        police.wait_for(lambda p: p.unique_events, what="an alarm through the restarted uplink")
    finally:
        assert everything.stop() == 0
        listener.close()
    assert "stopped uplink (exit 0)" in everything.log()
    assert "stopped button (exit 0)" in everything.log()


def test_a_second_copy_of_a_daemon_refuses_to_start(make_config, daemons):
    """Two uplinks would take the broker session from each other in a loop."""
    path, _ = make_config()
    first = daemons("uplink", path)
    second = subprocess.run([sys.executable, "-m", "edge", "run", "uplink", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 75  # EX_TEMPFAIL: the other one may be on its way out
    assert f"another uplink daemon is running (pid {first.pid}" in second.stderr
