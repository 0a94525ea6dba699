"""The fallback daemon: the second path, an SMS through a 4G modem when the platform has
not acknowledged an alarm in time (``daemon.py``: the decisions; ``modem_port.py``: the
modem and the message)."""

from edge.daemons.fallback.daemon import FallbackDaemon

__all__ = ["FallbackDaemon"]
