"""The platform side of presence (:mod:`edge.contract.presence`): what a platform instance
publishes so that devices know whether anybody is there to take an alarm.

    presence = PlatformPresence(signer, "guardpost/v1", "desk-1")
    topic, online, will = presence.connecting()     # before every CONNECT
    client.will_set(topic, will, qos=1, retain=True)
    ... connect; on CONNACK: client.publish(topic, online, qos=1, retain=True)
    ... at a clean stop: client.publish(*presence.stopping(), qos=1, retain=True)
"""

from __future__ import annotations

import time

from edge.contract.presence import presence_body, presence_topic
from edge.platform.signer import PlatformSigner


class PlatformPresence:
    def __init__(self, signer: PlatformSigner, root: str, platform_id: str):
        self.signer = signer
        self.platform_id = platform_id
        self.topic = presence_topic(root, platform_id)
        self.session = 0

    def connecting(self) -> tuple[str, bytes, bytes]:
        """A new session: ``(topic, online, will)``, both signed now. The session is the
        Unix time in ms, and always above the last one (a clock stepped back included)."""
        self.session = max(self.session + 1, time.time_ns() // 1_000_000)
        online = self._signed("online")
        will = self._signed("offline", "connection lost")
        return self.topic, online, will

    def stopping(self) -> tuple[str, bytes]:
        """``(topic, payload)`` of a clean stop: offline, this session."""
        return self.topic, self._signed("offline", "shutdown")

    def _signed(self, state: str, reason: str | None = None) -> bytes:
        return self.signer.sign(self.topic, presence_body(self.platform_id, state,
                                                          self.session, reason))
