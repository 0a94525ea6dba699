"""The daemons, one per systemd unit: button, uplink, camera, selftest, fallback; and
``run all``'s supervisor."""
