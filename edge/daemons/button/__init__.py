"""The button daemon: the first link of the alarm path (GPIO -> latch -> outbox)."""
