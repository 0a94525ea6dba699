"""``guardpost``: one command for every daemon and tool.

    guardpost run button|uplink|camera|selftest|fallback|all   the daemons
    guardpost sim press INPUT [--hold S]  press a simulated button (mock GPIO only)
    guardpost reset [--input NAME]        clear the alarm latch (records Contact ID 465)
    guardpost queue [--json]              the outbox by state and priority
    guardpost status [--json]             the device, its daemons, its alarm state
    guardpost config check FILE           validate a configuration file
    guardpost provision --site ...        write the identity, broker and keys
    guardpost broker-acl LIST [-o FILE]   the broker's ACL file from the list of identities
    guardpost doctor [--json]             commissioning check, step by step
    guardpost test-alarm                  the end-to-end alarm test, now, stage by stage
    guardpost report --month YYYY-MM      the monthly record (Markdown, CSV or JSON)
    guardpost watch [--ack]               a minimal stand-in for the police platform
    guardpost verify [FILE]               check a captured event's device signature
    guardpost demo [--auto]               the whole device in simulation, with a local broker
    guardpost ha-discovery --broker H     Home Assistant discovery configs for every device

Exit codes: 0 success; 1 failure or unhealthy; 69 a daemon is not running;
78 bad configuration (systemd does not restart a unit that exits 78).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from edge import __version__
from edge.config import EX_CONFIG, Config, ConfigError, load_config

EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
DEFAULT_CONFIG = "/etc/guardpost/guardpost.toml"

log = logging.getLogger("guardpost")


def _setup_logging(level: str, tag: str) -> None:
    # Under systemd, journald stamps each line itself.
    from edge.runtime.logs import OneLineFormatter

    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    handler = logging.StreamHandler(sys.stderr)
    # A message's contents (an acknowledgement's "by") cannot start a log line of their own.
    handler.setFormatter(OneLineFormatter(f"{stamp}%(levelname)-7s {tag}: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        handlers=[handler], force=True)


def _load(path: str, *, broker_files: bool = False) -> Config:
    """Commands that connect to the broker check its files (TLS, password); the others,
    the button daemon first, must work without them."""
    return load_config(path, check_broker_files=broker_files)


def _run_until_signalled(daemon, before=None) -> int:
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        daemon.wake()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if before is not None:
        before()  # with the handlers in place: a SIGTERM it brings is a clean stop
    result = daemon.run(stop)
    return result if isinstance(result, int) else 0


def cmd_run(args) -> int:
    from drivers.gpio import PinFactoryError

    # `run all` leaves the broker's files to the uplink child: the button must run anyway.
    config = _load(args.config, broker_files=args.daemon == "uplink")
    if args.daemon == "all":
        from edge.daemons.supervisor import Supervisor

        # The self-test last: its first checks find the others running.
        daemons = (["button", "uplink"] + (["camera"] if config.cameras else [])
                   + (["fallback"] if config.fallback else []) + ["selftest"])
        from edge.runtime.instance import AlreadyRunning

        try:
            return _run_until_signalled(Supervisor(
                Path(args.config), config.storage.runtime_dir, daemons=daemons,
                log_level=args.log_level))
        except AlreadyRunning as err:
            log.error("%s: `run all` is already running for this device", err)
            return 1
    if args.daemon == "button":
        from edge.daemons.button.daemon import ButtonDaemon as Daemon
    elif args.daemon == "camera":
        from edge.daemons.camera import CameraDaemon as Daemon
    elif args.daemon == "selftest":
        from edge.daemons.selftest.daemon import SelfTestDaemon as Daemon
    elif args.daemon == "fallback":
        from edge.daemons.fallback import FallbackDaemon as Daemon
    else:
        from edge.daemons.uplink.daemon import UplinkDaemon as Daemon
    from edge.runtime.instance import AlreadyRunning, die_with_parent

    try:
        return _run_until_signalled(Daemon(config), before=die_with_parent)
    except PinFactoryError as err:
        log.error("%s", err)
        # A factory that is not installed is a configuration matter (78: no restart
        # loop); one that failed to open (permissions not yet applied at boot, a busy
        # chip) may work on the next try.
        return EX_CONFIG if err.permanent else EX_TEMPFAIL
    except AlreadyRunning as err:
        log.error("%s; not starting a second one", err)
        return EX_TEMPFAIL  # the other one may be on its way out: try again later


def cmd_sim_press(args) -> int:
    from edge.runtime.control import ControlUnavailable, request

    config = _load(args.config)
    try:
        reply = request(config.storage.runtime_dir / "button.ctl",
                        {"op": "press", "input": args.input, "hold": args.hold},
                        timeout=args.hold + 15)
    except ControlUnavailable as err:
        print(f"the button daemon is not running ({err})", file=sys.stderr)
        return EX_UNAVAILABLE
    if not reply.get("ok"):
        print(f"press refused: {reply.get('error')}", file=sys.stderr)
        return 1
    if not reply["accepted"]:
        print(f"pressed {args.input} for {args.hold:g} s: ignored ({reply['reason']})")
        return 1
    event = reply["event"]
    what = (f"repeat {event['repeat']} of alarm {event['repeat_of']}" if event["repeat_of"]
            else f"new {event['kind']}")
    print(f"pressed {args.input} for {args.hold:g} s: {what} recorded, seq {event['seq']}, "
          f"id {event['id']}")
    return 0


def cmd_reset(args) -> int:
    from edge.daemons.button.latch import UnknownInput, reset_alarms

    config = _load(args.config)
    by = args.by or f"{os.environ.get('SUDO_USER') or getpass.getuser()} (guardpost reset)"
    try:
        events = reset_alarms(config, by, args.input)
    except UnknownInput:
        print(f"no input named {args.input!r}; inputs: {', '.join(config.inputs)}",
              file=sys.stderr)
        return 1
    if not events:
        print("no alarm is latched; nothing to reset")
    for event in events:
        print(f"reset {event.draft.input}: alarm {event.draft.detail['alarm_id']} cleared "
              f"(reset event seq {event.seq}, id {event.id})")
    return 0


def _outbox_unreadable(err: Exception) -> int:
    """A tool that only looks found the outbox unreadable: say what and what happens next."""
    print(f"the outbox cannot be read: {err}\n"
          "The daemons move a damaged outbox aside (outbox.db.damaged-<time>), start a new "
          "one and read back what they can; a full disk is reported by `guardpost doctor`.",
          file=sys.stderr)
    return 1


def cmd_queue(args) -> int:
    from edge.store.outbox import Outbox, OutboxError
    from edge.tools.status import queue_json, queue_text

    config = _load(args.config)
    try:
        with Outbox(config.storage.database, config.identity, repair=False) as outbox:
            summary = outbox.summary()
    except OutboxError as err:
        return _outbox_unreadable(err)
    print(queue_json(summary) if args.json else queue_text(summary))
    return 0


def cmd_status(args) -> int:
    import json

    from edge.store.outbox import Outbox, OutboxError
    from edge.tools.status import collect_status, healthy, status_text

    config = _load(args.config)
    try:
        with Outbox(config.storage.database, config.identity, repair=False) as outbox:
            status = collect_status(config, outbox)
    except OutboxError as err:
        return _outbox_unreadable(err)
    print(json.dumps(status, indent=2, ensure_ascii=False) if args.json else status_text(status))
    return 0 if healthy(status) else 1


def cmd_config_check(args) -> int:
    config = load_config(args.file)
    inputs = ", ".join(f"{n} (GPIO{s.pin}, {s.contact}, {s.mode})"
                       for n, s in config.inputs.items())
    print(f"{args.file}: OK\n  device {config.device.site_id}/{config.device.device_id} "
          f"({config.device.location})\n  broker {config.broker.host}:{config.broker.port}, "
          f"MQTT {config.broker.protocol}{', TLS' if config.broker.tls else ''}\n"
          f"  topics {config.topic_prefix}/...\n  GPIO {config.gpio.pin_factory}: {inputs}\n"
          f"  fingerprint {config.fingerprint()}")
    return 0


def cmd_watch(args) -> int:
    from edge.tools.watch import Watcher

    config = _load(args.config, broker_files=True)
    signer = None
    if args.ack:
        from edge.platform import PlatformSigner

        if not args.key or not args.key_id:
            print("--ack needs --key and --key-id: a device believes only signed "
                  "acknowledgements", file=sys.stderr)
            return EX_USAGE
        try:
            signer = PlatformSigner.from_file(args.key_id, args.key)
        except (OSError, ValueError) as err:
            print(f"--key: {err}", file=sys.stderr)
            return EX_USAGE
    device_keys = None
    if args.device_keys:
        from edge.platform import DeviceKeys

        try:
            device_keys = DeviceKeys.load(args.device_keys)
        except (OSError, ValueError) as err:
            print(f"--device-keys: {err}", file=sys.stderr)
            return EX_USAGE
    watcher = Watcher(config.broker, config.uplink.topic_root, args.site or config.device.site_id,
                      ack=args.ack, as_json=args.json, count=args.count,
                      client_id=args.client_id, by=args.by, signer=signer,
                      device_keys=device_keys)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        watcher.done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        watcher.start()
    except OSError as err:
        print(f"cannot connect to {config.broker.host}:{config.broker.port}: {err}",
              file=sys.stderr)
        return EX_UNAVAILABLE
    watcher.done.wait()
    watcher.stop()
    return 0


def cmd_verify(args) -> int:
    from edge.tools.verify import run_verify

    return run_verify(args.file, public_key_text=args.public_key, device_keys=args.device_keys,
                      config_path=args.config, topic=args.topic, as_json=args.json)


def cmd_provision(args) -> int:
    from edge.tools.provision import ProvisionError, apply, plan_provision

    try:
        plan = plan_provision(Path(args.config), site=args.site, device=args.device,
                              location=args.location, broker=args.broker, ca=args.ca,
                              cert=args.cert, key=args.key, bundle=args.bundle,
                              new_key=args.new_key, platform_keys=args.platform_keys)
    except ProvisionError as err:
        print(f"provision: {err}; nothing was written", file=sys.stderr)
        return 1
    try:
        apply(plan)
    except PermissionError as err:
        print(f"provision: {err.filename}: permission denied (run it as root); nothing "
              "was written", file=sys.stderr)
        return 1
    for path, _, mode in plan.files:
        print(f"wrote {path} ({mode:o})")
    for note in plan.notes:
        print(note)
    return 0


# -- the broker's ACL (issue 13) ---------------------------------------------------------

def cmd_broker_acl(args) -> int:
    from edge.tools.broker_acl import (
        IdentitiesError,
        acl_text,
        certificate_names,
        load_identities,
        write_atomically,
    )

    try:
        identities = load_identities(args.identities)
    except IdentitiesError as err:
        print(f"{err.source}: not a valid list of identities (nothing was written):",
              file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return EX_CONFIG
    text = acl_text(identities, args.identities.name)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        write_atomically(args.output, text)
    except OSError as err:
        print(f"broker-acl: cannot write {args.output}: {err.strerror}; nothing was written",
              file=sys.stderr)
        return 1
    names = certificate_names(identities)
    print(f"wrote {args.output}; each certificate must have this name (CN):")
    width = max(len(name) for name, _ in names)
    for name, what in names:
        print(f"  {name:<{width}}  {what}")
    return 0


def cmd_doctor(args) -> int:
    from edge.tools.doctor import run_doctor

    return run_doctor(Path(args.config), as_json=args.json, press_timeout=args.press_timeout,
                      ack_timeout=args.ack_timeout, press_input=args.input)


def cmd_test_alarm(args) -> int:
    """Run the alarm test here and now, printing each stage as it passes."""
    from edge.contract.events import utc_now
    from edge.daemons.selftest.alarmtest import AlarmTestRunner, TestBusy, request_test
    from edge.store.outbox import Outbox

    config = _load(args.config)
    if args.ack_timeout is not None:
        config = config.model_copy(update={"alarm_test": config.alarm_test.model_copy(
            update={"ack_timeout_s": args.ack_timeout})})

    def show(stage: str, info: dict) -> None:
        if stage == "started":
            how = ("test relay (covers the wiring)" if info["method"] == "relay"
                   else "software (does NOT cover the button's wiring)")
            print(f"alarm test {info['test_id']}: Contact ID {info['code']}, by {how}")
        elif stage == "edge":
            print(f"  edge       {info['occurred_at']}  the input saw the press "
                  f"(event seq {info['seq']})")
        elif stage in ("committed", "sent", "acknowledged"):
            column = {"committed": "committed_at", "sent": "sent_at",
                      "acknowledged": "acknowledged_at"}[stage]
            what = {"committed": "durable in the outbox", "sent": "the broker has it (PUBACK)",
                    "acknowledged": "the platform acknowledged it"
                    + (f" ({info['acknowledged_by']})" if info.get("acknowledged_by") else "")}
            print(f"  {stage:<10} {info[column]}  {what[stage]}")
        sys.stdout.flush()

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Outbox(config.storage.database, config.identity) as outbox:
        test_id = request_test(outbox, "manual")
        try:
            outcome = AlarmTestRunner(config, outbox, progress=show, stop=stop).run(test_id)
        except TestBusy as err:
            # Refused, not failed: the path was not tried, and the fault of the
            # alarm test follows tests that ran.
            outbox.alarm_tests.end_without_result(test_id, "refused", at=utc_now(),
                                                  reason=str(err), only_if_requested=True)
            print(f"not run: {err}", file=sys.stderr)
            return EX_TEMPFAIL
    if outcome is None:  # not waiting to run any more: taken by someone else
        print(f"not run: test {test_id} was no longer waiting", file=sys.stderr)
        return EX_TEMPFAIL
    if outcome.cut_short:
        print(f"CANCELLED before its end ({outcome.reason})")
        return 1
    if outcome.passed:
        ms = outcome.stages_ms
        print(f"PASSED in {ms['total']:.1f} ms (edge->commit {ms['edge_to_commit']:.1f}, "
              f"commit->broker {ms['commit_to_sent']:.1f}, broker->platform "
              f"{ms['sent_to_ack']:.1f} ms)")
        return 0
    print(f"FAILED at stage {outcome.failed_stage}: {outcome.reason}")
    return 1


def cmd_report(args) -> int:
    from edge.tools.report import build_report, render_csv, render_json, render_markdown

    config = _load(args.config)
    try:
        report = build_report(config.storage.database, args.month, config.device.zone,
                              identity=config.identity, keep_days=config.storage.keep_days)
    except ValueError as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    render = {"md": render_markdown, "csv": render_csv, "json": render_json}[args.format]
    text = render(report)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_demo(args) -> int:
    from edge.tools.demo import run_demo

    return run_demo(auto=args.auto, workdir=args.workdir, log_level=args.log_level)


# -- the platform's side: a fleet of simulated devices (issue 14) -------------------------

def cmd_fleet_sim(args) -> int:
    from edge.tools import fleet_sim

    return fleet_sim.main(args)


def _fleet_sim_arguments(parser) -> None:
    parser.add_argument("--devices", type=int, required=True, help="how many devices")
    parser.add_argument("--broker", required=True,
                        help="HOST[:PORT] (1883 by default), or several, comma-separated (the "
                             "nodes of a cluster: devices are spread over them and move to "
                             "the next one when their link is lost)")
    parser.add_argument("--protocol", choices=("5", "3.1.1"), default="5",
                        help="MQTT version (NATS speaks 3.1.1 only)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds after every device is up (default: until SIGTERM)")
    parser.add_argument("--alarm-every", type=float, default=5.0,
                        help="mean seconds between two alarms in the whole fleet (0: none)")
    parser.add_argument("--test-every", type=float, default=15.0,
                        help="mean seconds between two tests in the whole fleet (0: none)")
    parser.add_argument("--heartbeat", type=float, default=30.0,
                        help="each device's heartbeat interval (the contract's default 30 s)")
    parser.add_argument("--snapshots", type=int, default=2,
                        help="snapshots after each alarm and test")
    parser.add_argument("--snapshot-kb", type=int, default=60, help="size of each snapshot")
    parser.add_argument("--root", default="guardpost/v1", help="topic root")
    parser.add_argument("--site-prefix", default="fleet-school",
                        help="site ids are PREFIX-00000, PREFIX-00001 ...")
    parser.add_argument("--cafile", help="TLS: the broker's CA (enables TLS)")
    parser.add_argument("--certfile", help="TLS: a client certificate")
    parser.add_argument("--keyfile", help="TLS: its key")
    parser.add_argument("--broker-pid", type=int, help="a local broker's pid: its CPU time")
    parser.add_argument("--seed", type=int, help="for the same alarms and tests each run")
    parser.add_argument("--drain", type=float, default=10.0,
                        help="at the end, seconds to wait for acknowledgements still due")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("--device-keys-out", metavar="FILE",
                        help="write the devices' public keys here (JSON, for --device-keys "
                             "of guardpost console or verify)")


# -- the platform's side: the duty-desk console (issue 14) --------------------------------

def cmd_console(args) -> int:
    from edge.console import command

    return command.main(args)


def _console_arguments(parser) -> None:
    parser.add_argument("--broker", required=True, help="HOST[:PORT] (1883 by default)")
    parser.add_argument("--site", action="append", default=[],
                        help="only this school (site id); again for more (default: all)")
    parser.add_argument("--key", type=Path,
                        help="the desk's Ed25519 private key (PEM), a key with the role ack: "
                             "without it the console cannot acknowledge")
    parser.add_argument("--key-id", help="the key's id, as the devices' trust lists it")
    parser.add_argument("--snapshots", type=Path, help="save camera snapshots in this folder")
    parser.add_argument("--device-keys", type=Path,
                        help="the devices' event-signing public keys (TOML or JSON, as for "
                             "guardpost verify): events are checked, failures flagged")
    parser.add_argument("--group", help="share the events with the other consoles of this "
                                        "group (an MQTT 5 shared subscription)")
    parser.add_argument("--platform-id",
                        help="this console's presence id (default: console-<hostname>)")
    parser.add_argument("--root", default="guardpost/v1", help="topic root")
    parser.add_argument("--cafile", help="TLS: the broker's CA (enables TLS)")
    parser.add_argument("--certfile", help="TLS: the desk's client certificate")
    parser.add_argument("--keyfile", help="TLS: its key")


# -- the platform's side: Home Assistant discovery (issue 14) ------------------------------

def cmd_ha_discovery(args) -> int:
    from edge.platform import ha_publisher

    return ha_publisher.main(args)


def _ha_discovery_arguments(parser) -> None:
    parser.add_argument("--broker", required=True, help="HOST[:PORT] (1883 by default)")
    parser.add_argument("--site", action="append", default=[],
                        help="only this school (site id); again for more (default: all)")
    parser.add_argument("--prefix", default="homeassistant",
                        help="Home Assistant's discovery prefix")
    parser.add_argument("--root", default="guardpost/v1", help="the devices' topic root")
    parser.add_argument("--once", action="store_true",
                        help="publish for the devices the broker knows now, then exit "
                             "(default: keep running until SIGTERM, following new births)")
    parser.add_argument("--remove", action="store_true",
                        help="publish empty configs: Home Assistant removes the entities")
    parser.add_argument("--timeout", type=float, default=15.0,
                        help="--once: seconds to wait for the broker")
    parser.add_argument("--cafile", help="TLS: the broker's CA (enables TLS)")
    parser.add_argument("--certfile", help="TLS: a client certificate")
    parser.add_argument("--keyfile", help="TLS: its key")


def build_parser() -> argparse.ArgumentParser:
    default_config = os.environ.get("GUARDPOST_CONFIG", DEFAULT_CONFIG)
    parser = argparse.ArgumentParser(
        prog="guardpost", description="Guardpost: the one-key emergency alarm terminal")
    parser.add_argument("--version", action="version", version=f"guardpost {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("GUARDPOST_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p):
        p.add_argument("-c", "--config", default=default_config,
                       help=f"configuration file (default: $GUARDPOST_CONFIG or {DEFAULT_CONFIG})")
        return p

    run = with_config(commands.add_parser("run", help="run a daemon"))
    run.add_argument("daemon",
                     choices=["button", "uplink", "camera", "selftest", "fallback", "all"])
    run.set_defaults(func=cmd_run)

    sim = commands.add_parser("sim", help="simulation tools (mock GPIO only)")
    sim_commands = sim.add_subparsers(dest="sim_command", required=True, metavar="SIM_COMMAND")
    press = with_config(sim_commands.add_parser("press", help="press a simulated panic input"))
    press.add_argument("input")
    press.add_argument("--hold", type=float, default=0.2, help="seconds held (default 0.2)")
    press.set_defaults(func=cmd_sim_press)

    reset = with_config(commands.add_parser("reset", help="clear the latched alarm"))
    reset.add_argument("--input", help="only this input (default: all)")
    reset.add_argument("--by", help="who is resetting (recorded in the event)")
    reset.set_defaults(func=cmd_reset)

    queue = with_config(commands.add_parser("queue", help="the outbox by state and priority"))
    queue.add_argument("--json", action="store_true")
    queue.set_defaults(func=cmd_queue)

    status = with_config(commands.add_parser("status", help="device, daemons and alarm state"))
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True,
                                            metavar="CONFIG_COMMAND")
    check = config_commands.add_parser("check", help="validate a configuration file")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)

    watch = with_config(commands.add_parser("watch", help="a minimal police platform stand-in"))
    watch.add_argument("--ack", action="store_true", help="acknowledge alarms and tests")
    watch.add_argument("--site", help="site to watch (default: this device's; '+' for all)")
    watch.add_argument("--json", action="store_true", help="one JSON object per message")
    watch.add_argument("--count", type=int, help="exit after this many events")
    watch.add_argument("--client-id", help="MQTT client id (default: gp-watch-SITE)")
    watch.add_argument("--by", default="guardpost watch", help="acknowledging operator")
    watch.add_argument("--key", help="with --ack: the platform's Ed25519 private key (PEM)")
    watch.add_argument("--key-id", help="with --ack: the key's id in the device's "
                                        "[[trust.platform_keys]]")
    watch.add_argument("--device-keys", help="verify every event's device signature with "
                                             "this registry (TOML or JSON)")
    watch.set_defaults(func=cmd_watch)

    verify = with_config(commands.add_parser(
        "verify", help="check that a captured event was signed by its device"))
    verify.add_argument("file", nargs="?", help="the event payload as published (default: "
                                                "standard input)")
    keys = verify.add_mutually_exclusive_group()
    keys.add_argument("--public-key", help="the device's event-signing public key (base64url)")
    keys.add_argument("--device-keys", help="a registry of device keys (TOML or JSON): the "
                                            "event's site and device pick the key")
    verify.add_argument("--topic", help="the topic it arrived on (must name its device)")
    verify.add_argument("--json", action="store_true", help="one JSON object on stdout")
    verify.set_defaults(func=cmd_verify)

    provision = with_config(commands.add_parser(
        "provision", help="write the device's identity, broker and keys"))
    provision.add_argument("--site", required=True, help="site id (the school)")
    provision.add_argument("--device", required=True, help="device id within the site")
    provision.add_argument("--location", required=True, help="where it is, for people")
    provision.add_argument("--broker", required=True, help="HOST[:PORT] (port 8883 by default)")
    provision.add_argument("--ca", type=Path, help="CA certificate of the platform's broker")
    provision.add_argument("--cert", type=Path, help="the device certificate the platform issued")
    provision.add_argument("--key", type=Path, help="an existing private key to use")
    provision.add_argument("--bundle", type=Path, help="PKCS#12 bundle: key, certificate, CA")
    provision.add_argument("--new-key", action="store_true", help="replace the device's key")
    provision.add_argument("--platform-keys", type=Path,
                           help="the platform's public keys it hands out: a TOML file of "
                                "[[trust.platform_keys]] (key_id, public_key, roles)")
    provision.set_defaults(func=cmd_provision)

    broker_acl = commands.add_parser(
        "broker-acl", help="write the broker's ACL file from the list of identities")
    broker_acl.add_argument("identities", type=Path,
                            help="the list (TOML; see config/mosquitto/identities.example.toml)")
    broker_acl.add_argument("-o", "--output", type=Path,
                            help="the ACL file to replace (default: print it)")
    broker_acl.set_defaults(func=cmd_broker_acl)

    doctor = with_config(commands.add_parser(
        "doctor", help="commissioning check: every part, PASS or FAIL with the reason"))
    doctor.add_argument("--json", action="store_true", help="one JSON document on stdout")
    doctor.add_argument("--press-timeout", type=float, default=30.0,
                        help="seconds to wait for the panic button to be pressed")
    doctor.add_argument("--input", help="the panic input to press (default: the test relay's, "
                                        "or the first); a press on any other is an alarm")
    doctor.add_argument("--ack-timeout", type=float, default=30.0,
                        help="seconds to wait for the platform's acknowledgement")
    doctor.set_defaults(func=cmd_doctor)

    test_alarm = with_config(commands.add_parser(
        "test-alarm", help="run the end-to-end alarm test now (a test, never an alarm)"))
    test_alarm.add_argument("--ack-timeout", type=float,
                            help="seconds to wait for the platform (default: alarm_test)")
    test_alarm.set_defaults(func=cmd_test_alarm)

    report = with_config(commands.add_parser(
        "report", help="the monthly record: tests, alarms, faults, time online"))
    report.add_argument("--month", required=True, help="YYYY-MM, in the site's time zone")
    report.add_argument("--format", choices=["md", "csv", "json"], default="md")
    report.add_argument("-o", "--output", help="write to this file instead of stdout")
    report.set_defaults(func=cmd_report)

    demo = commands.add_parser("demo", help="the whole device in simulation")
    demo.add_argument("--auto", action="store_true",
                      help="play a scripted story (press, outage, reconnect, reset) and exit")
    demo.add_argument("--workdir", type=Path, help="keep the demo's files here")
    demo.set_defaults(func=cmd_demo)

    fleet = commands.add_parser(
        "fleet-sim", help="N simulated devices in one process, with a platform that "
                          "acknowledges, printing the alarm round trip and the broker's load")
    _fleet_sim_arguments(fleet)
    fleet.set_defaults(func=cmd_fleet_sim)

    console = commands.add_parser(
        "console", help="the duty-desk console: every device online/offline/lost, alarms "
                        "with a bell, acknowledge with a key (needs the extra 'console')")
    _console_arguments(console)
    console.set_defaults(func=cmd_console)

    ha = commands.add_parser(
        "ha-discovery", help="Home Assistant MQTT discovery for every device on a broker: "
                             "panic button, connectivity, health (configs only; Home "
                             "Assistant reads the devices' own topics)")
    _ha_discovery_arguments(ha)
    ha.set_defaults(func=cmd_ha_discovery)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Files any command creates (the outbox and its lock, mark and reserve, pid files,
    # sockets, snapshots, a report) get the modes the units give them (UMask=0007) also
    # when a person runs it by hand: nothing for other users, read and write for the
    # group guardpost. Exactly that, not the person's own: 0022 would leave the outbox
    # world-readable, 0077 would lock the other daemons, each its own user, out of it.
    os.umask(0o007)
    tag = f"{args.daemon}" if args.command == "run" else args.command
    _setup_logging(args.log_level, tag)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"{err.source}: configuration is not valid:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
