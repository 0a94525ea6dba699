"""The platform contract: events, topics, payloads and the messages the platform sends."""
