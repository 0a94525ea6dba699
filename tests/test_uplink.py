"""The uplink against a real broker: contract, acknowledgements, priority, protocols, TLS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from edge.config import load_config
from edge.contract.events import ContactId, EventDraft, EventKind, utc_now
from edge.contract.messages import Topics
from edge.daemons.button.latch import AlarmLatch
from edge.daemons.uplink.daemon import MARK_BATCH, Backoff
from edge.daemons.uplink.resend import Resend
from edge.daemons.uplink.window import InFlight, PublishWindow
from edge.runtime.wake import wake
from edge.store.outbox import Outbox
from edge.tools.broker_acl import Identities, PlatformIdentity, Site, acl_text
from edge.tools.localbroker import BrokerTls, LocalBroker
from tests.conftest import sim_document, write_toml
from tests.support.daemons import poll_until
from tests.support.pki import BrokerPki, write_broker_pki
from tests.support.platform import PlatformStandIn
from tests.support.trust import DUTY_DESK
from tests.test_alarm_path import online


def alarm_is_delivered_and_acknowledged(police, config, how: str) -> None:
    event_id = commit_alarm(config)
    police.wait_for(lambda p: [e for e in p.events() if e["id"] == event_id],
                    what=f"the alarm {how}")
    with Outbox(config.storage.database, config.identity) as outbox:
        poll_until(lambda: outbox.event_states([event_id])[event_id] == "acknowledged",
                   what=f"the acknowledgement {how}")


def commit_alarm(config) -> str:
    with Outbox(config.storage.database, config.identity) as outbox:
        event = AlarmLatch(outbox, config.inputs).press("gate")
    wake(config.storage.runtime_dir, "uplink")
    return event.id


def test_birth_heartbeat_and_clean_offline_share_one_session_counter(make_config, daemons,
                                                                     platform):
    path, config = make_config(uplink={"heartbeat_interval": 1})
    police = platform(config)
    uplink = daemons("uplink", path)
    birth = online(police)[0]
    assert birth["version"] and birth["config"] == config.fingerprint()
    # How to judge its silence (issue 14): its own settings, not a fleet-wide guess.
    assert (birth["heartbeat_interval_s"], birth["keepalive_s"], birth["dark_after_s"]) == \
        (1.0, config.broker.keepalive, 1.5 * config.broker.keepalive)
    beats = police.wait_for(lambda p: len(p.on("health")) >= 2 and p.on("health"),
                            what="two heartbeats")
    assert {b["session"] for b in beats} == {birth["session"]}
    assert beats[-1]["outbox"] == {"queued": 0, "sent_unacknowledged": 0,
                                   "oldest_unsent_age_s": None, "last_seq": 0}
    assert uplink.stop() == 0
    offline = police.wait_for(lambda p: [s for s in p.on("status") if s["state"] == "offline"],
                              what="the offline status")[0]
    assert (offline["session"], offline["reason"]) == (birth["session"], "shutdown")
    retained = [m for m in police.messages if m.leaf == "status"]
    assert all(m.properties.ContentType == "application/json" for m in retained)


def test_malformed_and_unknown_acknowledgements_are_rejected_and_the_uplink_carries_on(
        make_config, daemons, platform, open_outbox):
    path, config = make_config()
    police = platform(config)
    daemons("uplink", path)
    online(police)

    police.publish("ack", b"{not json")
    police.publish("ack", DUTY_DESK.sign(f"{police.prefix}/ack", {"event_id": "42"}))
    police.acknowledge("01234567-89ab-7def-8123-456789abcdef")
    police.command("reboot", {"schema": "guardpost/cmd-reboot@1", "request_id": "r1"},
                   conforming=False)
    rejected = police.wait_for(lambda p: len(p.on("rejected")) >= 4 and p.on("rejected"),
                               what="four rejections")
    reasons = [r["reason"] for r in rejected]
    assert reasons[0].startswith("not believed: not JSON")
    assert reasons[1].startswith("event_id: String should match pattern")
    assert reasons[2] == "unknown event id 01234567-89ab-7def-8123-456789abcdef"
    assert rejected[3]["topic"].endswith("/cmd/reboot")
    assert reasons[3].startswith("unknown command 'reboot'")
    assert rejected[3]["request_id"] == "r1"

    # Still working: an alarm is delivered and its acknowledgement taken.
    event_id = commit_alarm(config)
    police.wait_for(lambda p: [e for e in p.events() if e["id"] == event_id], what="the alarm")
    police.acknowledge(event_id, by="operator 7")
    outbox = open_outbox(config)
    poll_until(lambda: outbox.event_states([event_id])[event_id] == "acknowledged",
               what="the acknowledgement")


def test_a_live_alarm_overtakes_a_backlog_being_drained(make_config, daemons, platform,
                                                        open_outbox):
    path, config = make_config()
    window = config.uplink.inflight_window
    with Outbox(config.storage.database, config.identity) as outbox, outbox.transaction():
        for _ in range(20_000):
            outbox.append(EventDraft(kind=EventKind.FAULT, code=ContactId.PANIC_ZONE_TROUBLE,
                                     occurred_at=utc_now(), clock_synced=True, boot_id="t"))
    police = platform(config)
    daemons("uplink", path)
    police.wait_for(lambda p: p.unique_events, what="the drain to begin")

    alarm_id = commit_alarm(config)
    still_queued = open_outbox(config).backlog()["queued"] - 1  # faults, after the commit
    assert still_queued > 5 * window, "the backlog drained before the alarm: test is void"

    police.wait_for(lambda p: len(p.unique_events) >= 20_001, timeout=120, what="everything")
    order = [e["id"] for e in police.unique_events]
    faults_after_alarm = len(order) - 1 - order.index(alarm_id)
    # Only what was already in flight, or delivered but not yet recorded as sent (still
    # "queued" in the count above), may go first.
    assert faults_after_alarm >= still_queued - MARK_BATCH - 2 * window


def test_mqtt_3_1_1_works_the_same(broker, make_config, daemons):
    path, config = make_config(broker={"protocol": "3.1.1"})
    police = PlatformStandIn(broker.host, broker.port, config.topic_prefix, ack=True,
                             protocol=paho.MQTTv311, client_id="platform-311").start()
    try:
        daemons("uplink", path)
        online(police)
        alarm_is_delivered_and_acknowledged(police, config, "over MQTT 3.1.1")
    finally:
        police.stop()
    assert not police.schema_problems


# -- mutual TLS ------------------------------------------------------------------------

def test_mutual_tls_to_a_broker_that_requires_client_certificates(tls_site, daemons):
    path, config = tls_site.config()
    police = tls_site.platform(config)
    try:
        uplink = daemons("uplink", path)
        online(police)
        event_id = commit_alarm(config)
        police.wait_for(lambda p: [e for e in p.events() if e["id"] == event_id],
                        what="the alarm over TLS")
        assert "TLS" in uplink.lines[uplink.wait_for_line("uplink ready")]
    finally:
        police.stop()
    assert not police.schema_problems


def test_without_a_client_certificate_the_broker_refuses_and_nothing_is_lost(tls_site, daemons):
    path, config = tls_site.config("no-cert.toml", client_certificate=False)
    uplink = daemons("uplink", path)
    uplink.wait_for_line("closed the connection before accepting it")
    commit_alarm(config)
    with Outbox(config.storage.database, config.identity) as outbox:
        assert outbox.backlog()["queued"] == 1


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_an_uplink_restart_resends_only_what_was_not_confirmed(make_config, daemons, platform,
                                                               protocol, open_outbox):
    path, config = make_config(broker={"protocol": protocol})
    # (It acknowledges: an alarm left unacknowledged is published again after a while.)
    police = platform(config, ack=True)
    uplink = daemons("uplink", path)
    online(police)
    first = commit_alarm(config)
    police.wait_for(lambda p: p.unique_events, what="the first alarm")
    outbox = open_outbox(config)
    poll_until(lambda: outbox.event_states([first])[first] == "acknowledged",
               what="PUBACK and acknowledgement recorded")
    uplink.stop()
    second = commit_alarm(config)  # committed while the uplink is down
    daemons("uplink", path)
    police.wait_for(lambda p: len(p.unique_events) >= 2, what="the second alarm")
    assert [e["id"] for e in police.unique_events] == [first, second]
    assert police.event_copies == 2


# -- the broker ACL, as `guardpost broker-acl` writes it ----------------------------------

@dataclass
class AclSite:
    broker: LocalBroker
    pki: BrokerPki

    def device_tls(self, who: str) -> dict:
        """[broker.tls] of a device configuration that connects with ``who``'s certificate."""
        credential = self.pki.identities[who]
        return {"tls": {"ca_file": str(self.pki.ca.cert), "cert_file": str(credential.cert),
                        "key_file": str(credential.key)}}

    def platform(self, prefix: str, **kwargs) -> PlatformStandIn:
        police = self.pki.identities["police"]
        return PlatformStandIn(self.broker.host, self.broker.port, prefix, tls={
            "ca_certs": str(self.pki.ca.cert), "certfile": str(police.cert),
            "keyfile": str(police.key)}, **kwargs).start()


def _acl_broker(tmp_path: Path) -> AclSite:
    """A broker that takes each certificate's CN as user name and client id and applies
    the ACL that `guardpost broker-acl` writes for the test site."""
    pki = write_broker_pki(tmp_path / "pki", {"device": "test-school/gate-1",
                                              "other": "test-school/gate-2",
                                              "police": "platform:police"})
    identities = Identities(sites=[Site(id="test-school", devices=["gate-1", "gate-2"])],
                            platforms=[PlatformIdentity(name="police", roles=["ack"])])
    (tmp_path / "acl").write_text(acl_text(identities))
    tls = BrokerTls(ca_file=pki.ca.cert, cert_file=pki.broker.cert, key_file=pki.broker.key)
    return AclSite(LocalBroker(tmp_path / "acl-broker", tls=tls, acl_file=tmp_path / "acl",
                               extra_config="use_identity_as_username true\n"
                                            "use_username_as_clientid true"), pki)


def test_the_written_acl_lets_a_device_do_its_job_and_nothing_else(tmp_path, daemons):
    site = _acl_broker(tmp_path)
    with site.broker as guarded:
        doc = sim_document(tmp_path, guarded.port, broker=site.device_tls("device"))
        config = load_config(write_toml(tmp_path / "acl.toml", doc))
        police = site.platform(config.topic_prefix, ack=True)
        try:
            daemons("uplink", tmp_path / "acl.toml")
            online(police)
            alarm_is_delivered_and_acknowledged(police, config, "through the ACL")
            # The doctor checks the broker without connecting as the device: on this
            # broker (client id = the certificate's CN) that would drop the uplink's
            # connection and, with a clean start, the session the broker keeps for it.
            from edge.runtime.mqtt import tls_handshake
            from edge.tools.doctor import Doctor, Step

            doctor, step = Doctor(tmp_path / "acl.toml"), Step("broker over TLS")
            doctor.config = config
            doctor.check_broker(step)
            assert step.status == "PASS" and "the uplink is connected" in step.detail
            assert tls_handshake(config.broker) is None  # what it does without an uplink
            alarm_is_delivered_and_acknowledged(police, config, "after the doctor's checks")
            assert len([s for s in police.on("status") if s["state"] == "online"]) == 1
        finally:
            police.stop()
        assert not police.schema_problems


def test_a_publish_the_broker_refuses_stays_queued_and_is_reported(tmp_path, daemons):
    """A device given another device's certificate: MQTT 5 tells it 'not authorised' in
    the PUBACK; the alarm is neither lost nor marked sent, and the log says why."""
    site = _acl_broker(tmp_path)
    with site.broker as guarded:
        doc = sim_document(tmp_path, guarded.port, broker=site.device_tls("other"))
        config = load_config(write_toml(tmp_path / "wrong.toml", doc))
        uplink = daemons("uplink", tmp_path / "wrong.toml")
        uplink.wait_for_line("connected to")
        commit_alarm(config)
        uplink.wait_for_line("broker refused outbox row 1")
        with Outbox(config.storage.database, config.identity) as outbox:
            assert outbox.backlog()["queued"] == 1


def test_reconnect_backoff_doubles_with_jitter_and_is_capped_at_30_s():
    draws = iter([0.0, 1.0] * 10)
    backoff = Backoff(first=0.5, cap=30.0, rng=lambda: next(draws))
    delays = [backoff.next_delay() for _ in range(10)]
    # Each delay lies between half and all of a ceiling that doubles up to the cap.
    assert delays == [0.25, 1.0, 1.0, 4.0, 4.0, 16.0, 15.0, 30.0, 15.0, 30.0]
    backoff.reset()
    assert backoff.next_delay() == 0.25


def test_the_loop_sleeps_while_nothing_can_be_published(make_config):
    """A row refused by the broker is due for its retry, but the window is full (a
    stalled link): the loop must wait for the network, not spin until a slot frees."""
    _, config = make_config()
    window = PublishWindow(config, Topics(config.topic_prefix), snapshots=None,
                           resend=Resend(10, 600), wake_button=lambda: None)
    now = 1000.0
    window._refused = {InFlight(seq=1, priority=0): now - 1}  # due a second ago
    assert window.next_due(now, room=False) == float("inf")  # window full: nothing to do
    assert window.next_due(now, room=True) == 0.0             # room: retry now


def test_a_snapshot_the_broker_refuses_is_dropped_not_retried_forever(tmp_path, daemons):
    """An ACL without the snapshot topic: the alarm goes through, its picture is refused
    (MQTT 5 PUBACK 0x87) and dropped with its file, instead of being re-sent every 30 s."""
    from edge.store.snapshots import SnapshotStore
    from tests.test_camera import _snapshot

    site = _acl_broker(tmp_path)
    acl = (tmp_path / "acl").read_text()
    (tmp_path / "acl").write_text("\n".join(line for line in acl.splitlines()
                                            if "snapshot" not in line) + "\n")
    with site.broker as guarded:
        doc = sim_document(tmp_path, guarded.port, broker=site.device_tls("device"))
        config = load_config(write_toml(tmp_path / "acl.toml", doc))
        # Someone listens: an event nobody subscribes to is not delivered (PUBACK 0x10).
        police = site.platform(config.topic_prefix)
        alarm_id = commit_alarm(config)
        with Outbox(config.storage.database, config.identity) as outbox:
            store = SnapshotStore(outbox, config.storage.spool_dir, 10_000_000)
            store.write(_snapshot("gate-cam", 2000), event_id=alarm_id, event_kind="alarm",
                        event_time=utc_now(), idx=0, phase="pre")
            uplink = daemons("uplink", tmp_path / "acl.toml")
            uplink.wait_for_line("dropped: the broker refused it")
            poll_until(lambda: outbox.backlog()["queued"] == 0, what="the alarm to be sent")
            poll_until(lambda: outbox.db.execute("SELECT count(*) FROM snapshots").fetchone()[0]
                       == 0 and not list(config.storage.spool_dir.rglob("*.jpg")),
                       what="the refused snapshot and its file to go")
            assert uplink.log().count("dropped: the broker refused it") == 1
        police.stop()


def test_the_backoff_holds_at_its_cap_through_a_long_outage():
    """An outage of hours is thousands of attempts: the delay stays at the cap (2 ** 1024
    would not be a float, and the uplink crashed on it)."""
    from edge.daemons.uplink.connection import Backoff

    backoff = Backoff(0.05, 30.0, rng=lambda: 1.0)
    delays = [backoff.next_delay() for _ in range(5000)]
    assert delays[-1] == 30.0 and max(delays) == 30.0
