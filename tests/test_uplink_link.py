"""The uplink on a bad link: outages, a slow link, a half-open link, a broker that forgets.

A fault-injecting proxy (tests/support/proxy.py) sits between the uplink and a real
Mosquitto; the platform stand-in talks to the broker directly, so what it receives is
what the broker really delivered.
"""

from __future__ import annotations

import itertools
import threading

import pytest

from edge.config import load_config
from edge.store.outbox import Outbox
from edge.tools.localbroker import LocalBroker
from tests.conftest import sim_document, write_toml
from tests.support.daemons import DaemonProcess, poll_until
from tests.support.modem_sim import ModemSimulator
from tests.support.platform import PlatformStandIn
from tests.support.proxy import FaultProxy
from tests.test_alarm_path import online, press
from tests.test_sdnotify import more_pings
from tests.test_uplink import commit_alarm

DUTY = ["+8613800138000"]


@pytest.fixture
def proxy(broker):
    with FaultProxy(broker.port) as running:
        yield running


def arrived(police, event_id: str, timeout: float, what: str) -> dict:
    return police.wait_for(lambda p: next((e for e in p.events() if e["id"] == event_id), None),
                           timeout=timeout, what=what)


# -- class 2: never late after an outage ---------------------------------------------------

def test_an_alarm_pressed_during_an_outage_reaches_the_broker_within_a_second_of_it_coming_back(
        make_config, daemons, platform, proxy):
    # A backoff grown long: the next ordinary attempt is 10 to 20 s away.
    path, config = make_config(broker={"port": proxy.port},
                               uplink={"reconnect_min": 20, "reconnect_max": 30})
    police = platform(config)
    uplink = daemons("uplink", path)
    online(police)
    proxy.cut(refuse=True)
    uplink.wait_for_line("disconnected from the broker")

    alarm_id = commit_alarm(config)
    refused_so_far = proxy.accepted
    proxy.wait_for_connections(refused_so_far + 1)  # it tries while the link is still down
    proxy.passing()
    arrived(police, alarm_id, timeout=2, what="the alarm within a second or so of the link")


def test_a_link_whose_round_trip_exceeds_the_connect_timeout_still_connects(
        make_config, daemons, platform, proxy):
    """A 4G modem in poor signal: every round trip takes 1.5 s, the configured connect
    timeout is 0.5 s. The timeouts grow until the connection is made."""
    proxy.delay(1.5)
    path, config = make_config(broker={"port": proxy.port, "connect_timeout": 0.5})
    police = platform(config)
    uplink = daemons("uplink", path)
    online(police)  # waits up to 15 s
    assert uplink.wait_for_line("no CONNACK from the broker") < uplink.wait_for_line(
        "connected to")
    alarm_id = commit_alarm(config)
    arrived(police, alarm_id, timeout=15, what="the alarm over the slow link")


def test_a_connection_attempt_that_hears_nothing_never_stops_the_watchdog(
        make_config, listener, proxy):
    """The link drops every packet: each attempt waits out its (growing) timeout, on a
    helper thread, while the loop goes on feeding systemd's watchdog."""
    watchdog_s = 2.0
    proxy.cut(unreachable=True)
    path, _ = make_config(broker={"port": proxy.port, "connect_timeout": 4})
    uplink = DaemonProcess("uplink", path, listener,
                           extra_env={"WATCHDOG_USEC": str(int(watchdog_s * 1e6))}).start()
    try:
        fed = more_pings(listener, uplink.pid, 5, timeout=30)
        assert all(later - earlier < watchdog_s for earlier, later in itertools.pairwise(fed))
        assert "cannot connect" in uplink.lines[uplink.wait_for_line("timed out after 4 s")]
    finally:
        uplink.stop()


# -- class 3: a half-open link, and the fallback learning of it --------------------------

def test_a_half_open_link_is_dropped_when_an_alarm_gets_no_puback_and_the_alarm_goes_on_a_new_one(
        make_config, daemons, platform, proxy):
    path, config = make_config(broker={"port": proxy.port})
    police = platform(config)
    uplink = daemons("uplink", path)
    online(police)
    proxy.black_hole(new_connections=False)  # the link in use goes silent; a new one works

    alarm_id = commit_alarm(config)
    # Keepalive (5 s here) would notice only after about two of them; the alarm's own
    # missing PUBACK (3 s by default) is what drops the link.
    arrived(police, alarm_id, timeout=6, what="the alarm over a new connection")
    assert "no PUBACK" in uplink.lines[uplink.wait_for_line("no PUBACK")]


@pytest.fixture
def modem():
    with ModemSimulator() as sim:
        yield sim


def test_the_fallback_learns_at_once_that_the_uplink_died_and_sends_the_sms(
        make_config, daemons, platform, modem):
    """A ten-minute acknowledgement timeout: only "the uplink is not connected" can send
    this SMS, and it must be known at once, not when an old database record goes stale."""
    path, config = make_config(modem={"port": modem.port, "status_interval_s": 5},
                               fallback={"duty_numbers": DUTY, "ack_timeout_s": 600})
    police = platform(config)
    daemons("button", path)
    uplink = daemons("uplink", path)
    daemons("fallback", path)
    online(police)

    uplink.kill()
    alarm = press(config)
    [(number, text)] = modem.wait_for_messages(1, timeout=10)
    assert number == DUTY[0] and alarm["id"] in text


# -- class 4: a PUBACK is not delivery ------------------------------------------------------

@pytest.fixture
def forgetful_broker(tmp_path):
    """A broker that keeps nothing across a restart (no persistence)."""
    with LocalBroker(tmp_path / "forgetful", persistence=False) as running:
        yield running


def forgetful_config(tmp_path, broker: LocalBroker, **uplink):
    path = write_toml(tmp_path / "forgetful.toml",
                      sim_document(tmp_path, broker.port, uplink=uplink))
    return path, load_config(path)


def test_an_alarm_the_broker_took_and_then_forgot_in_a_restart_is_published_again(
        tmp_path, forgetful_broker, daemons):
    path, config = forgetful_config(tmp_path, forgetful_broker)
    police = PlatformStandIn(forgetful_broker.host, forgetful_broker.port, config.topic_prefix,
                             client_id="platform-forgetful").start()
    try:
        uplink = daemons("uplink", path)
        online(police)
        police.stop()  # away for a moment: the broker queues for its persistent session
        alarm_id = commit_alarm(config)
        with Outbox(config.storage.database, config.identity) as outbox:
            poll_until(lambda: outbox.event_states([alarm_id])[alarm_id] == "sent",
                       what="the broker's PUBACK")
        forgetful_broker.stop()   # ... and forgets that queue
        forgetful_broker.start()
        police.start()
        arrived(police, alarm_id, timeout=15, what="the alarm published again")
        assert uplink.process.poll() is None
    finally:
        police.stop()
    assert not police.schema_problems


def test_an_alarm_nobody_subscribes_to_stays_queued_until_the_platform_listens(
        make_config, daemons, platform, open_outbox):
    path, config = make_config()
    uplink = daemons("uplink", path)
    uplink.wait_for_line("connected to")
    alarm_id = commit_alarm(config)
    uplink.wait_for_line("No matching subscribers")
    outbox = open_outbox(config)
    assert outbox.event_states([alarm_id])[alarm_id] == "queued"
    police = platform(config, ack=True)
    arrived(police, alarm_id, timeout=15, what="the alarm once the platform listens")
    poll_until(lambda: outbox.event_states([alarm_id])[alarm_id] == "acknowledged",
               what="its acknowledgement")


def _alarms_through_restarts(tmp_path, broker: LocalBroker, daemons, restarts: int) -> None:
    """Alarms committed without pause while the broker restarts, forgetting everything each
    time; every one must reach the platform, judged by what the platform received."""
    path, config = forgetful_config(tmp_path, broker)
    police = PlatformStandIn(broker.host, broker.port, config.topic_prefix, ack=True,
                             client_id="platform-restarts").start()
    committed: list[str] = []
    stop = threading.Event()

    def guard() -> None:
        while not stop.wait(0.02):
            committed.append(commit_alarm(config))

    presser = threading.Thread(target=guard)
    try:
        uplink = daemons("uplink", path)
        online(police)
        connected = uplink.wait_for_line("connected to")
        presser.start()
        for restart in range(restarts):
            # Alarms keep coming, and the platform has most of them, when the broker goes.
            police.wait_for(lambda p, n=restart: len(committed) >= 15 * (n + 1)
                            and len(p.unique_events) >= len(committed) - 5,
                            timeout=30, what="alarms flowing before the restart")
            broker.stop()
            broker.start()
            connected = uplink.wait_for_line("connected to", after=connected + 1)
        stop.set()
        presser.join(10)
        expected = set(committed)
        police.wait_for(lambda p: expected <= {e["id"] for e in p.unique_events}, timeout=60,
                        what=f"all {len(expected)} alarms at the platform")
        assert len(expected) > 10 * restarts  # alarms were pressed all along
    finally:
        stop.set()
        police.stop()
    assert not police.schema_problems


def test_alarms_pressed_through_three_broker_restarts_without_persistence_all_arrive(
        tmp_path, forgetful_broker, daemons):
    _alarms_through_restarts(tmp_path, forgetful_broker, daemons, restarts=3)


@pytest.mark.slow
def test_alarms_pressed_through_thirty_broker_restarts_without_persistence_all_arrive(
        tmp_path, forgetful_broker, daemons):
    _alarms_through_restarts(tmp_path, forgetful_broker, daemons, restarts=30)
