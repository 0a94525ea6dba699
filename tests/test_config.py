"""Configuration: validated once at start; a bad file names the key and exits 78."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge.config import EX_CONFIG, ConfigError, credential_store, load_config, parse_config
from tests.conftest import sim_document, write_toml
from tests.support.device_keys import KEY_FILE, write_event_key

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "guardpost.example.toml"


def guardpost(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True,
                          text=True, timeout=60)


def problems_of(tmp_path: Path, **sections) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(sim_document(tmp_path, 1883, **sections))
    return caught.value.problems


def test_the_annotated_example_is_valid_once_its_files_exist(tmp_path):
    text = EXAMPLE.read_text()
    for name in ("ca.pem", "device.pem", "device.key"):
        (tmp_path / name).write_text("placeholder")
        text = text.replace(f"/etc/guardpost/tls/{name}", str(tmp_path / name))
    write_event_key(tmp_path / "credentials")
    path = tmp_path / "guardpost.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.broker.tls is not None and config.gpio.pin_factory == "lgpio"
    assert config.topic_prefix == "guardpost/v1/school-330106-0042/gate-south-1"


def test_a_simulation_configuration_is_valid(tmp_path):
    config = parse_config(sim_document(tmp_path, 1883))
    assert config.simulated and config.inputs["gate"].min_press_ms == 10


@pytest.mark.parametrize(("sections", "expected"), [
    ({"inputs": {"gate": {"pin": 17, "pinn": 4}}}, "inputs.gate.pinn: unknown key"),
    ({"device": {"site_id": "school/1"}}, "device.site_id: String should match pattern"),
    ({"broker": {"port": 70000}}, "broker.port: Input should be less than or equal to 65535"),
    ({"broker": {"protocol": "4"}}, "broker.protocol: Input should be '5' or '3.1.1'"),
    ({"gpio": {"pin_factory": "pigpio"}}, "gpio.pin_factory: 'pigpio' is not a pin factory"),
    ({"gpio": {"pin_factory": "rpigpio"}},  # no edge times: a late callback shortens presses
     "gpio.pin_factory: 'rpigpio' is refused: RPi.GPIO reports no edge times"),
    ({"storage": {"database": "/var/lib/guardpost/out\x00box.db"}},
     "storage.database: contains a NUL character"),
    ({"device": {"location": "South\x00gate"}}, "device.location: contains a NUL character"),
    ({"alarm_test": {"schedule": "0 0 31 2 *"}},
     "alarm_test.schedule: '0 0 31 2 *' never fires"),
    ({"inputs": {"gate": {"pin": 17, "min_press_ms": 50}}},
     "inputs.gate.min_press_ms: Input should be less than or equal to 20"),
    ({"inputs": {}}, "inputs: Dictionary should have at least 1 item"),
    ({"uplink": {"reconnect_max": 60}}, "uplink.reconnect_max: Input should be less than or equal"),
    ({"uplink": {"topic_root": "/guardpost/#"}}, "uplink.topic_root: String should match"),
    ({"outputs": {"buzzer": {"pin": 17}}},
     "GPIO 17 is used by both inputs.gate and outputs.buzzer"),
    ({"broker": {"tls": {"ca_file": "/x", "cert_file": "/y"}}},
     "broker.tls: cert_file and key_file must be given together"),
    ({"broker": {"password_file": "/etc/hostname"}}, "broker: password_file needs a username"),
    ({"storage": {"runtime_dir": "/tmp/" + "x" * 120}}, "storage: runtime_dir is too long"),
    ({"device": None}, "device: required key is missing"),
    ({"modem": {"port": "/dev/ttyUSB2", "sms_timeout_s": 120}},  # the watchdog's 150 s
     "modem.sms_timeout_s: Input should be less than or equal to 60"),
])
def test_each_mistake_is_reported_with_its_key(tmp_path, sections, expected):
    found = problems_of(tmp_path, **sections)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_at_once(tmp_path):
    found = problems_of(tmp_path, broker={"port": 0, "keepalive": 1},
                        inputs={"gate": {"pin": 99}})
    assert {p.split(":")[0] for p in found} == {"broker.port", "broker.keepalive",
                                                "inputs.gate.pin"}


def test_files_the_configuration_names_must_be_readable_now(tmp_path):
    found = problems_of(tmp_path, broker={"tls": {"ca_file": str(tmp_path / "missing.pem")}})
    assert found == [f"broker.tls.ca_file: cannot read {tmp_path / 'missing.pem'}: "
                     "No such file or directory"]


def test_syntax_errors_and_missing_files(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[device\nsite_id = 1\n")
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_config(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nowhere.toml")


def test_the_fingerprint_ignores_comments_but_not_values(tmp_path):
    doc = sim_document(tmp_path, 1883)
    a = write_toml(tmp_path / "a.toml", doc)
    b = tmp_path / "b.toml"
    b.write_text("# a comment\n" + a.read_text())
    assert load_config(a).fingerprint() == load_config(b).fingerprint()
    doc["broker"]["port"] = 1884
    c = write_toml(tmp_path / "c.toml", doc)
    assert load_config(c).fingerprint() != load_config(a).fingerprint()


def test_config_check_prints_every_error_with_its_key_and_exits_78(tmp_path):
    path = write_toml(tmp_path / "bad.toml", sim_document(
        tmp_path, 1883, inputs={"gate": {"pin": 17, "contact": "NO"}}))
    result = guardpost("config", "check", str(path))
    assert result.returncode == EX_CONFIG
    assert "inputs.gate.contact: Input should be 'normally-open' or 'normally-closed'" \
        in result.stderr
    good = write_toml(tmp_path / "good.toml", sim_document(tmp_path, 1883))
    result = guardpost("config", "check", str(good))
    assert result.returncode == 0 and "OK" in result.stdout


@pytest.mark.parametrize("daemon", ["button", "uplink", "all"])
def test_a_daemon_started_with_a_bad_configuration_exits_78_naming_the_key(tmp_path, daemon):
    path = write_toml(tmp_path / "bad.toml", sim_document(tmp_path, 1883,
                                                          broker={"keepalive": "often"}))
    result = guardpost("run", daemon, "--config", str(path))
    assert result.returncode == EX_CONFIG
    assert "broker.keepalive: Input should be a valid integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_pin_factory_this_machine_lacks_is_refused_at_start_with_exit_78(tmp_path):
    path = write_toml(tmp_path / "pi.toml", sim_document(tmp_path, 1883,
                                                         gpio={"pin_factory": "lgpio"}))
    result = guardpost("run", "button", "--config", str(path))
    assert result.returncode == EX_CONFIG
    assert "pin factory 'lgpio' is not available" in result.stderr


def test_secrets_named_as_credentials_come_from_systemd_or_beside_the_configuration(tmp_path):
    doc = sim_document(tmp_path, 1883, broker={
        "username": "gate-1", "password_file": "credential:mqtt-password"})
    by_hand = credential_store(tmp_path / "guardpost.toml", environ={})
    write_event_key(tmp_path / "credentials")  # the default trust.event_key
    (tmp_path / "credentials" / "mqtt-password").write_text("secret\n")
    config = parse_config(doc, credentials=by_hand)
    assert config.broker.password_file == tmp_path / "credentials" / "mqtt-password"

    systemd_dir = tmp_path / "run-credentials"
    systemd_dir.mkdir()
    (systemd_dir / "gp_mqtt-password").write_text("secret\n")  # LoadCredential=gp:<dir>
    write_event_key(systemd_dir, f"gp_{KEY_FILE}")
    as_unit = credential_store(tmp_path / "guardpost.toml",
                               environ={"CREDENTIALS_DIRECTORY": str(systemd_dir)})
    assert parse_config(doc, credentials=as_unit).broker.password_file == \
        systemd_dir / "gp_mqtt-password"
    with pytest.raises(ConfigError, match=r"broker\.password_file: cannot read"):
        parse_config(doc, credentials=credential_store(tmp_path / "elsewhere" / "g.toml",
                                                       environ={}))


def test_the_button_daemon_runs_without_the_uplinks_secrets(tmp_path, daemons):
    """Provisioned, certificate not yet issued (or the key readable by root only): the
    uplink refuses to start, naming the file; the alarm path runs regardless."""
    path = write_toml(tmp_path / "awaiting-certificate.toml", sim_document(
        tmp_path, 1883, broker={"tls": {"ca_file": str(tmp_path / "ca.pem"),
                                        "cert_file": "credential:device.pem",
                                        "key_file": "credential:device.key"}}))
    daemons("button", path)  # READY=1: it records alarms
    uplink = guardpost("run", "uplink", "--config", str(path))
    assert uplink.returncode == EX_CONFIG
    assert "broker.tls.ca_file: cannot read" in uplink.stderr
    assert "broker.tls.key_file: cannot read" in uplink.stderr
