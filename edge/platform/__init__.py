"""The platform's side of the contract, for an integrator who starts without code of their
own: sign acknowledgements and commands for a device (:class:`PlatformSigner`), verify the
events devices sign (:func:`verify_event`, :class:`DeviceKeys`)."""

from edge.platform.events import DeviceKeys, EventNotVerified, verify_event, verify_snapshot
from edge.platform.signer import PlatformSigner

__all__ = ["DeviceKeys", "EventNotVerified", "PlatformSigner", "verify_event",
           "verify_snapshot"]
