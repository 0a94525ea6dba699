"""``guardpost doctor`` end to end in simulation: a real TLS broker, real daemons, a
platform that acknowledges; and the failure an installer meets most (no broker)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from drivers.camera.testcard import frame_number, write_video
from edge.runtime.clock import clock_synchronised
from edge.runtime.control import request
from edge.tools.localbroker import free_port
from tests.conftest import sim_document, write_toml
from tests.support.daemons import poll_until
from tests.test_alarm_path import online, press


def doctor(config_path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge", "doctor", "--json",
                             "--config", str(config_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def by_name(report: dict) -> dict:
    return {step["name"]: step for step in report["steps"]}


def test_doctor_walks_every_step_and_the_press_is_a_test_not_an_alarm(tls_site, daemons):
    path, config = tls_site.config()
    police = tls_site.platform(config, ack=True)
    try:
        daemons("button", path)
        daemons("uplink", path)
        online(police)
        checking = doctor(path, "--press-timeout", "30")
        for line in checking.stderr:  # progress goes to stderr with --json
            if "press the panic button gate on GPIO17 now" in line:
                break
        press(config)  # the installer presses the button
        report = json.loads(checking.stdout.read())
        checking.wait(60)
    finally:
        police.stop()
    steps = by_name(report)
    assert [s["status"] for s in report["steps"]] == [
        "PASS", "PASS", "PASS", "SKIP", "PASS", "PASS",
        "PASS" if clock_synchronised() else "FAIL", "PASS", "SKIP"]
    assert checking.returncode == (0 if clock_synchronised() else 1)
    assert "on gate arrived; recorded as test" in steps["panic button"]["detail"]
    round_trip = steps["test event round trip"]
    assert round_trip["detail"].endswith("acknowledged by test platform")
    assert round_trip["data"]["stages"]["acknowledged_at"]
    [test] = police.events("test")
    assert (test["code"], test["input"], test["detail"]["covers_wiring"]) == (601, "gate", True)
    assert police.events("alarm") == []  # commissioning never raises an alarm
    assert not police.schema_problems


def test_doctor_says_plainly_what_fails_when_the_broker_is_down(tls_site, daemons):
    path, _ = tls_site.config()
    broker = tls_site.broker
    daemons("button", path)
    daemons("uplink", path)
    broker.stop()
    checking = doctor(path, "--press-timeout", "0.5", "--ack-timeout", "2")
    report = json.loads(checking.stdout.read())
    assert checking.wait(60) == 1 and report["ok"] is False
    steps = by_name(report)
    assert steps["configuration"]["status"] == "PASS"
    assert steps["panic button"]["detail"] == "no press of gate within 0.5 s"
    assert steps["broker over TLS"]["status"] == "FAIL"
    assert "Connection refused" in steps["broker over TLS"]["detail"]
    assert "did not reach the broker" in steps["test event round trip"]["detail"]
    assert "software test" not in steps["test event round trip"]["detail"]


def test_doctor_finds_an_alternate_broker_that_does_not_answer(tls_site, daemons):
    """The backup link is checked at commissioning, while the primary serves."""
    dead = free_port()   # nothing listens there
    path, config = tls_site.config(alternates=[f"127.0.0.1:{dead}"])
    police = tls_site.platform(config)
    try:
        daemons("button", path)
        daemons("uplink", path)
        online(police)
        checking = doctor(path, "--press-timeout", "0.5", "--ack-timeout", "1")
        report = json.loads(checking.stdout.read())
        checking.wait(60)
    finally:
        police.stop()
    step = by_name(report)["broker over TLS"]
    assert step["status"] == "FAIL"
    assert "the uplink is connected" in step["detail"]
    assert f"127.0.0.1:{dead}: " in step["detail"] and "refused" in step["detail"]
    assert step["data"]["other_brokers"][f"127.0.0.1:{dead}"] != "ok"


def test_doctor_with_a_broken_configuration_stops_at_the_first_step(tmp_path):
    path = write_toml(tmp_path / "bad.toml", sim_document(tmp_path, 1883,
                                                          broker={"port": "x"}))
    checking = doctor(path)
    report = json.loads(checking.stdout.read())
    assert checking.wait(60) == 1
    [first, *rest] = report["steps"]
    assert first["status"] == "FAIL" and "broker.port" in first["detail"]
    assert {s["status"] for s in rest} == {"SKIP"}


def test_a_doctor_that_went_away_leaves_the_next_press_an_alarm(make_config, daemons):
    """The installer pressed Ctrl-C while the doctor waited for the button: the daemon
    must not keep turning the next real press into a test."""
    path, config = make_config()
    daemons("button", path)
    control = config.storage.runtime_dir / "button.ctl"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(control))
        client.sendall(json.dumps({"op": "test-press", "timeout": 60}).encode() + b"\n")
        poll_until(lambda: request(control, {"op": "status"})["test_press_pending"],
                   what="the daemon to wait for a test press")
    poll_until(lambda: not request(control, {"op": "status"})["test_press_pending"],
               what="the daemon to notice the doctor is gone")
    assert press(config)["kind"] == "alarm"


def test_doctor_saves_a_frame_from_every_camera(make_config, daemons, tmp_path):
    video = write_video(tmp_path / "gate.avi", [("counter", 10.0)])
    path, config = make_config(cameras={"gate-outside": {"source": str(video), "loop": True}})
    daemons("camera", path)
    poll_until(lambda: request(config.storage.runtime_dir / "camera.ctl",
                               {"op": "status"})["cameras"]["gate-outside"]["frames_read"] > 0,
               what="the first frame")
    checking = doctor(path, "--press-timeout", "0.5", "--ack-timeout", "0.5")
    report = json.loads(checking.stdout.read())
    checking.wait(60)
    camera = by_name(report)["camera"]
    assert camera["status"] == "PASS", camera
    saved = Path(camera["data"]["gate-outside"]["path"])
    assert saved.exists() and frame_number(saved.read_bytes()) >= 0
    assert "320x240 frame saved to" in camera["detail"]
