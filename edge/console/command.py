"""``guardpost console``: wire the model, the client and the screen together."""

from __future__ import annotations

import sys

from edge.console.client import ConsoleClient, ConsoleOptions, default_platform_id
from edge.console.fleet import Fleet
from edge.platform import DeviceKeys, PlatformSigner
from edge.tools.fleet_sim import parse_broker

INSTALL_HINT = ("guardpost console needs Textual: pip install 'guardpost[console]' "
                "(or: pip install textual)")


def main(args) -> int:
    try:
        from edge.console.app import ConsoleApp
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    if bool(args.key) != bool(args.key_id):
        print("console: --key and --key-id go together", file=sys.stderr)
        return 2
    try:
        signer = PlatformSigner.from_file(args.key_id, args.key) if args.key else None
        device_keys = DeviceKeys.load(args.device_keys) if args.device_keys else None
    except (OSError, ValueError) as err:
        print(f"console: {err}", file=sys.stderr)
        return 2
    host, port = parse_broker(args.broker)
    tls = ({"ca_certs": args.cafile, "certfile": args.certfile, "keyfile": args.keyfile}
           if args.cafile else None)
    options = ConsoleOptions(host, port, args.root, tuple(args.site), args.group,
                             args.platform_id or default_platform_id(), args.snapshots, tls)
    fleet = Fleet(args.site or None)
    app = None

    def on_alarm(alarm) -> None:
        if app is not None and app.is_running:
            app.call_from_thread(app.alarm_arrived, alarm)

    client = ConsoleClient(options, fleet, signer=signer, device_keys=device_keys,
                           on_alarm=on_alarm)
    app = ConsoleApp(fleet, client, broker=f"{host}:{port}")
    try:
        client.start()
    except OSError as err:
        print(f"console: cannot connect to {host}:{port}: {err}", file=sys.stderr)
        return 1
    try:
        app.run()
    finally:
        client.stop()
    return 0
