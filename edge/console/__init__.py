"""``guardpost console``: the duty-desk console.

- :mod:`edge.console.fleet` - the model: what the desk knows of every device, alarm and
  notice, fed decoded messages and a monotonic ``now`` (no I/O, no screen);
- :mod:`edge.console.client` - the MQTT 5 side: subscribes, verifies, saves snapshots,
  acknowledges, publishes the console's presence;
- :mod:`edge.console.app` - the Textual screen (an optional extra: ``.[console]``).
"""
