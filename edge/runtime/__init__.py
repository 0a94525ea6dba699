"""What every daemon shares: readiness and watchdog, wake-ups, control socket, clocks,
the MQTT client."""
