"""``guardpost ha-discovery``: Home Assistant discovery configs for the devices on a real
Mosquitto, read back retained, and every template rendered with Jinja2 (as Home Assistant
renders them: ``value_json`` = the parsed payload) against the messages a real device
published. No Home Assistant runs here: the keys and templates are what is checked."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho
import pytest
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from paho.mqtt.enums import CallbackAPIVersion

from edge.daemons.button.latch import reset_alarms
from edge.runtime.control import request
from tests.support.asyncapi import payload_problems

PREFIX = "homeassistant"
ROOT = "guardpost/v1"
CONFIG_TOPIC = re.compile(r"^homeassistant/(event|binary_sensor|sensor)/[a-zA-Z0-9_-]+/"
                          r"[a-zA-Z0-9_-]+/config$")
# The keys each component cannot do without (Home Assistant's MQTT docs), and ours.
REQUIRED = {"event": {"state_topic", "event_types"}, "binary_sensor": {"state_topic"},
            "sensor": {"state_topic"}}
COMMON = {"name", "unique_id", "device", "value_template", "qos"}
# Strict: a template naming a key the payload lacks fails here (HA would render it empty).
JINJA = ImmutableSandboxedEnvironment(undefined=StrictUndefined)


def render(template: str, payload: bytes) -> str:
    return JINJA.from_string(template).render(value_json=json.loads(payload)).strip()


def ha_discovery(broker, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge.tools.cli", "ha-discovery", "--broker",
         f"{broker.host}:{broker.port}", *args], capture_output=True, text=True,
        timeout=timeout)


class Retained:
    """Every retained message below a filter now, read with a fresh subscription (the
    probe published after subscribing comes back after the retained messages)."""

    def __init__(self, broker, topic_filter: str, tls: dict | None = None):
        self.messages: dict[str, bytes] = {}
        done, probe = threading.Event(), f"test-probe/{os.getpid()}/{time.monotonic_ns()}"
        client = client_for(tls)

        def on_message(c, userdata, message):
            if message.topic == probe:
                done.set()
            elif message.retain and message.payload:
                self.messages[message.topic] = message.payload

        def on_subscribe(c, *args):
            c.publish(probe, b"", qos=1)

        client.on_connect = lambda c, *a: c.subscribe([(topic_filter, 1), (probe, 1)])
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            assert done.wait(10), "the probe did not come back"
        finally:
            client.disconnect()
            client.loop_stop()

    def configs(self) -> dict[str, dict]:
        return {topic: json.loads(payload) for topic, payload in self.messages.items()}


def client_for(tls: dict | None) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    if tls:
        client.tls_set(**tls)
    return client


def publish_retained(broker, topic: str, payload: bytes, *, retain: bool = True,
                     tls: dict | None = None) -> None:
    client = client_for(tls)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def by_name(configs: dict[str, dict]) -> dict[str, dict]:
    return {config["name"]: config for config in configs.values()}


def birth(site: str, device: str, version: str = "0.1.0") -> bytes:
    return json.dumps({"schema": "guardpost/status@1", "state": "online", "session": 1,
                       "site_id": site, "device_id": device, "version": version}).encode()


def test_configs_of_a_real_device_render_its_real_messages(device, broker):
    running = device(uplink={"heartbeat_interval": 1})
    police, device_config = running.police, running.config
    prefix = device_config.topic_prefix
    # A health from before the press: nothing latched.
    police.wait_for(lambda p: p.on("health"), what="a heartbeat")
    quiet_health = next(m.payload for m in police.messages if m.leaf == "health")
    assert json.loads(quiet_health)["latched"] == []

    result = ha_discovery(broker, "--once")
    assert result.returncode == 0, result.stderr
    configs = Retained(broker, f"{PREFIX}/#").configs()
    assert len(configs) == 9, sorted(configs)
    unique_ids = {c["unique_id"] for c in configs.values()}
    assert len(unique_ids) == len(configs)
    device_topics = {f"{prefix}/{leaf}" for leaf in ("status", "health", "event/alarm",
                                                      "event/reset")}
    for topic, config in configs.items():
        assert CONFIG_TOPIC.match(topic), topic
        component = topic.split("/")[1]
        assert REQUIRED[component] | COMMON <= config.keys(), (topic, config.keys())
        assert config["state_topic"] in device_topics, config["state_topic"]
        assert config["device"]["identifiers"] == [
            f"guardpost_{config_site(config)}_gate-1"]
        assert config["device"]["manufacturer"] == "Guardpost"
        assert config["device"]["sw_version"] == police.on("status")[0]["version"]
        for availability in config.get("availability", []):
            assert availability["topic"] == f"{prefix}/status"
        if config["state_topic"] == f"{prefix}/health":
            assert config.get("availability"), f"{config['name']}: no availability"
    named = by_name(configs)
    assert named["Panic button"]["event_types"] == ["alarm"]
    assert named["Connectivity"]["device_class"] == "connectivity"

    # A real press: the alarm the device published, and a heartbeat with the latch.
    reply = request(device_config.storage.runtime_dir / "button.ctl",
                    {"op": "press", "input": "gate", "hold": 0.05})
    assert reply["accepted"], reply
    police.wait_for(lambda p: p.events("alarm"), what="the alarm")
    alarm = next(m for m in police.messages if m.leaf == "event/alarm")
    latched = police.wait_for(
        lambda p: next((m.payload for m in p.messages if m.leaf == "health"
                        and json.loads(m.payload)["latched"]), None),
        what="a heartbeat with the latch")

    event = json.loads(render(named["Panic button"]["value_template"], alarm.payload))
    assert event["event_type"] == "alarm"
    assert event["event_type"] in named["Panic button"]["event_types"]
    assert (event["input"], event["seq"], event["code"]) == ("gate", alarm.body["seq"], 120)
    assert render(named["Alarm latched"]["value_template"], quiet_health) == "OFF"
    assert render(named["Alarm latched"]["value_template"], latched) == "ON"
    assert render(named["Fault"]["value_template"], latched) == "OFF"
    assert json.loads(render(named["Fault"]["json_attributes_template"], latched)) == {
        "faults": []}
    health = json.loads(latched)
    assert render(named["Outbox queued"]["value_template"], latched) == str(
        health["outbox"]["queued"])
    assert render(named["Sent, unacknowledged"]["value_template"], latched) == str(
        health["outbox"]["sent_unacknowledged"])
    assert int(render(named["Uptime"]["value_template"], latched)) == round(health["uptime_s"])
    assert render(named["Police platform"]["value_template"], latched) in named[
        "Police platform"]["options"]

    # The same heartbeat with every figure different and a fault raised (still a valid
    # health message): a template reading the wrong field cannot pass by coincidence.
    varied = dict(health, outbox=dict(health["outbox"], queued=3, sent_unacknowledged=2),
                  uptime_s=4321.6, platform={"state": "offline", "instances": {"d": "offline"}},
                  checks={"button": {"ok": True, "fault": False, "summary": "fine"},
                          "wiring": {"ok": False, "fault": True, "summary": "loop open"}},
                  checked_at=health["at"])
    assert not payload_problems("health", varied)
    varied_payload = json.dumps(varied).encode()
    assert [render(named[name]["value_template"], varied_payload) for name in (
        "Outbox queued", "Sent, unacknowledged", "Uptime", "Police platform", "Fault",
        "Alarm latched")] == ["3", "2", "4322", "offline", "ON", "ON"]
    assert json.loads(render(named["Fault"]["json_attributes_template"], varied_payload)) == {
        "faults": ["wiring"]}
    fine = json.dumps(dict(varied, checks={"button": {"ok": True, "fault": False,
                                                       "summary": "fine"}})).encode()
    assert render(named["Fault"]["value_template"], fine) == "OFF"

    # The reset: its own event entity.
    reset_alarms(device_config, "test guard", None)
    police.wait_for(lambda p: p.events("reset"), what="the reset")
    reset = next(m for m in police.messages if m.leaf == "event/reset")
    assert json.loads(render(named["Alarm reset"]["value_template"], reset.payload))[
        "event_type"] == "reset"

    # Connectivity and availability: the birth, then the will after a kill.
    birth_payload = next(m.payload for m in police.messages if m.leaf == "status")
    available = named["Uptime"]["availability"][0]
    assert render(named["Connectivity"]["value_template"], birth_payload) == "ON"
    assert render(available["value_template"], birth_payload) == available[
        "payload_available"]
    os.kill(running.uplink.pid, signal.SIGKILL)
    police.wait_for(lambda p: any(s["state"] == "offline" for s in p.on("status")),
                    what="the will")
    will = next(m.payload for m in police.messages
                if m.leaf == "status" and json.loads(m.payload)["state"] == "offline")
    assert render(named["Connectivity"]["value_template"], will) == "OFF"
    assert render(available["value_template"], will) == available["payload_not_available"]


def config_site(config: dict) -> str:
    return config["state_topic"].split("/")[2]


def test_remove_clears_the_configs_and_malformed_births_are_ignored(broker):
    publish_retained(broker, f"{ROOT}/school.a/gate-1/status", birth("school.a", "gate-1"))
    publish_retained(broker, f"{ROOT}/school_a/gate-1/status", birth("school_a", "gate-1"))
    publish_retained(broker, f"{ROOT}/junk/gate-1/status", b"\xff not json")
    publish_retained(broker, f"{ROOT}/junk/gate-2/status", b"[1, 2]")
    # A status naming another device than its topic.
    publish_retained(broker, f"{ROOT}/junk/gate-3/status", birth("elsewhere", "gate-9"))

    result = ha_discovery(broker, "--once")
    assert result.returncode == 0, result.stderr
    assert "of 2 device(s)" in result.stdout and "ignored 3" in result.stdout, result.stdout
    configs = Retained(broker, f"{PREFIX}/#").configs()
    # 'school.a' and 'school_a' are two devices with valid, distinct node ids.
    nodes = {topic.split("/")[2] for topic in configs}
    assert len(nodes) == 2 and all(CONFIG_TOPIC.match(t) for t in configs), sorted(configs)
    assert {c["device"]["identifiers"][0] for c in configs.values()} == {
        "guardpost_school.a_gate-1", "guardpost_school_a_gate-1"}

    result = ha_discovery(broker, "--once", "--site", "school.a", "--remove")
    assert result.returncode == 0, result.stderr
    left = Retained(broker, f"{PREFIX}/#").configs()
    assert left and all(c["device"]["identifiers"] == ["guardpost_school_a_gate-1"]
                        for c in left.values()), sorted(left)
    assert ha_discovery(broker, "--once", "--remove").returncode == 0
    assert Retained(broker, f"{PREFIX}/#").configs() == {}


def test_a_new_version_updates_the_configs_while_it_runs(broker):
    publish_retained(broker, f"{ROOT}/school-1/gate-1/status", birth("school-1", "gate-1"))
    process = subprocess.Popen(
        [sys.executable, "-m", "edge.tools.cli", "ha-discovery", "--broker",
         f"{broker.host}:{broker.port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert wait_for_version(broker, "0.1.0")
        publish_retained(broker, f"{ROOT}/school-1/gate-1/status",
                         birth("school-1", "gate-1", version="0.2.0"))
        assert wait_for_version(broker, "0.2.0")
        # An alarm names the gate: the device's name becomes its location.
        publish_retained(broker, f"{ROOT}/school-1/gate-1/event/alarm", json.dumps(
            {"schema": "guardpost/event@1", "kind": "alarm", "location": "南门 South gate"}
        ).encode(), retain=False)
        assert wait_for_configs(broker, lambda c: c["device"]["name"] == "南门 South gate")
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "of 1 device(s)" in out


def wait_for_version(broker, version: str) -> bool:
    return wait_for_configs(broker, lambda c: c["device"].get("sw_version") == version)


def wait_for_configs(broker, condition, timeout: float = 20.0) -> bool:
    """All nine configs of the device meet ``condition`` (polled, with a deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        configs = Retained(broker, f"{PREFIX}/#").configs()
        if len(configs) == 9 and all(condition(c) for c in configs.values()):
            return True
        time.sleep(0.1)
    return False


def test_over_tls_with_a_client_certificate(tls_site):
    pki = tls_site.pki
    tls = {"ca_certs": str(pki["ca"][0]), "certfile": str(pki["device"][0]),
           "keyfile": str(pki["device"][1])}
    publish_retained(tls_site.broker, f"{ROOT}/school-1/gate-1/status",
                     birth("school-1", "gate-1"), tls=tls)
    result = ha_discovery(tls_site.broker, "--once", "--cafile", tls["ca_certs"],
                          "--certfile", tls["certfile"], "--keyfile", tls["keyfile"])
    assert result.returncode == 0, result.stderr
    assert len(Retained(tls_site.broker, f"{PREFIX}/#", tls=tls).configs()) == 9


@pytest.mark.parametrize(("value", "code", "says"), [
    ("127.0.0.1:notaport", 64, "port"), ("127.0.0.1:0", 64, "port"),
    ("host name:1883", 64, "HOST[:PORT]"), ("no-such-host.invalid:1883", 78, "no such host")])
def test_a_bad_broker_value_exits_with_a_clear_message(value, code, says):
    result = subprocess.run([sys.executable, "-m", "edge.tools.cli", "ha-discovery",
                             "--broker", value, "--once"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == code, result.stderr
    assert says in result.stderr
