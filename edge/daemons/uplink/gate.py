"""The gate every acknowledgement and command passes: who signed it, for which topic and
role, when, and never twice (:mod:`edge.contract.signing`; docs/contract.md, "Signed
acknowledgements and commands").

The checks that need no storage run as a message arrives (in paho's callback); the one
that does, "was this nonce accepted before", runs when the uplink settles what arrived,
where a storage failure is retried instead of being the message's fault. The newest time
accepted from each key is kept in memory and rebuilt from the outbox at start.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from datetime import datetime

from edge.contract.events import utc_now
from edge.contract.signing import KINDS, PAST, Keyring, Opened, Rejected, open_envelope
from edge.runtime.clock import clock_synchronised
from edge.store.outbox import Outbox

log = logging.getLogger(__name__)


class Gate:
    def __init__(self, keyring: Keyring):
        self.keyring = keyring
        self.untrusted: Counter[str] = Counter({kind: 0 for kind in KINDS})
        self._newest: dict[str, datetime] = {}
        self._pending: set[str] = set()   # nonces opened and not yet settled

    def load(self, outbox: Outbox) -> None:
        self._newest = outbox.nonces.newest(self.keyring.keys)

    def open(self, payload: bytes, topic: str, role: str) -> Opened:
        """The verified message, or :class:`Rejected` (counted by its kind)."""
        try:
            opened = open_envelope(payload, topic, self.keyring, role, now=utc_now(),
                                   clock_synced=clock_synchronised(),
                                   newest_accepted=self._newest.get,
                                   seen_nonce=self._pending.__contains__)
        except Rejected as err:
            self.untrusted[err.kind] += 1
            raise
        self._pending.add(opened.nonce)
        return opened

    def replays(self, outbox: Outbox, opened: Iterable[Opened]) -> set[str]:
        """Of these, the nonces the device accepted before (in an earlier run)."""
        found = outbox.nonces.seen(o.nonce for o in opened)
        self.untrusted["replay"] += len(found)
        return found

    def settled(self, opened: Iterable[Opened]) -> None:
        """Recorded in the outbox (by the caller, in the transaction of what they did)."""
        for o in opened:
            self._pending.discard(o.nonce)
            newest = self._newest.get(o.key_id)
            if newest is None or o.signed_at > newest:
                self._newest[o.key_id] = o.signed_at

    def record(self, outbox: Outbox, opened: list[Opened]) -> None:
        """Remember these nonces (for what was not recorded with an acknowledgement)."""
        if not opened:
            return
        with outbox.transaction():
            for o in opened:
                outbox.nonces.record(o.nonce, o.key_id, o.signed_at)
            outbox.nonces.prune({o.key_id for o in opened}, PAST)
        self.settled(opened)

    def forget_pending(self) -> None:
        """The connection ended: what was not settled will be delivered again."""
        self._pending.clear()

    def health(self) -> dict[str, int]:
        return dict(self.untrusted)
