"""The platform's side of the contract, for an integrator who starts without code of their
own: sign acknowledgements and commands for a device (:class:`PlatformSigner`)."""

from edge.platform.signer import PlatformSigner

__all__ = ["PlatformSigner"]
