"""The uplink daemon: the outbox to the platform's broker, and what comes back."""
