"""Log lines that a message's contents cannot forge.

An acknowledgement's ``by``, a command's request id, a camera's error: text that came from
outside is put into log lines. A newline in it would start a line of the attacker's
choosing ("... INFO uplink: platform acknowledged ..."), and journald would take it for
one of ours. So every message is formatted with its control characters escaped (a newline
is shown as ``\\n``); a traceback, which the formatter adds after the message, keeps its
lines.
"""

from __future__ import annotations

import logging
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]")


def escape_controls(text: str) -> str:
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class OneLineFormatter(logging.Formatter):
    """A formatter whose messages cannot span lines (see the module)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)
