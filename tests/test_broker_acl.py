"""``guardpost broker-acl``: the ACL file from the list of identities; bad input names its
key, exits 78 and leaves the file as it was. (What the ACL lets each identity do on a
real broker: tests/test_broker_config.py.)"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "mosquitto" / "identities.example.toml"


def broker_acl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", "broker-acl", *args],
                          capture_output=True, text=True, timeout=60)


def test_the_example_list_gives_each_identity_its_block_and_its_certificate_name(tmp_path):
    acl = tmp_path / "acl"
    result = broker_acl(str(EXAMPLE), "--output", str(acl))
    assert result.returncode == 0, result.stderr
    for name in ("school-330106-0042/gate-south-1", "school-330106-0042/gate-north-1",
                 "school-330106-0057/gate-1", "platform:duty-desk-xihu",
                 "platform:alarm-admin"):
        assert f"\n  {name} " in result.stdout           # the CN its certificate must have
        assert f"\nuser {name}\n" in acl.read_text()  # and its block
    text = acl.read_text()
    assert ("user platform:duty-desk-xihu\n"
            "topic read guardpost/v1/school-330106-0042/#\n"
            "topic write guardpost/v1/school-330106-0042/+/ack\n"
            "topic read guardpost/v1/school-330106-0057/#\n"
            "topic write guardpost/v1/school-330106-0057/+/ack\n") in text
    assert ("user platform:alarm-admin\ntopic read guardpost/v1/#\n"
            "topic write guardpost/v1/+/+/ack\ntopic write guardpost/v1/+/+/cmd/#\n") in text
    assert stat.S_IMODE(acl.stat().st_mode) == 0o644  # Mosquitto's own user reads it
    assert broker_acl(str(EXAMPLE)).stdout == text  # without --output: printed, the same


def test_a_new_acl_replaces_the_old_one_and_keeps_its_mode(tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("user someone\n")
    acl.chmod(0o640)
    assert broker_acl(str(EXAMPLE), "-o", str(acl)).returncode == 0
    assert "user platform:alarm-admin" in acl.read_text()
    assert stat.S_IMODE(acl.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acl"]  # no temporary left


@pytest.mark.parametrize(("change", "expected"), [
    (("gate-north-1", "gate/north"), "sites.0.devices.1: String should match pattern"),
    (('roles = ["ack"]', 'roles = ["ack", "silence"]'),
     "platforms.0.roles.1: Input should be 'ack' or 'command'"),
    (('"school-330106-0057"]', '"school-330106-9999"]'),
     "platforms.0.sites: 'school-330106-9999' is not one of the [[sites]]"),
    (('id = "school-330106-0057"', 'id = "school-330106-0042"'),
     "sites: 'school-330106-0042' is listed more than once"),
    (('devices = ["gate-1"]', 'devices = ["gate-1", "gate-1"]'),
     "sites.1.devices: listed more than once: gate-1"),
    (('topic_root = "guardpost/v1"', 'topic_root = "guardpost/#"'),
     "topic_root: String should match pattern"),
    (('name = "alarm-admin"', 'name = "alarm-admin"\ncolour = "red"'),
     "platforms.1.colour: unknown key"),
    (("[[sites]]", "[[sites]"), "not valid TOML"),
])
def test_bad_input_names_its_key_exits_78_and_writes_nothing(tmp_path, change, expected):
    identities = tmp_path / "identities.toml"
    text = EXAMPLE.read_text()
    assert change[0] in text
    identities.write_text(text.replace(change[0], change[1], 1))
    acl = tmp_path / "acl"
    acl.write_text("user the-old-one\n")
    result = broker_acl(str(identities), "--output", str(acl))
    assert result.returncode == 78
    assert expected in result.stderr and "nothing was written" in result.stderr
    assert acl.read_text() == "user the-old-one\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acl", "identities.toml"]
