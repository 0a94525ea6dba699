"""The outbox: the one SQLite repository every daemon and tool goes through."""
